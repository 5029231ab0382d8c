//! [`RateLimit`]: the service built by [`RateLimitLayer`](crate::RateLimitLayer).

use std::mem;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use toolwarden_core::{BoxError, McpRequest};
use tower_service::Service;

use crate::backend::RateLimitBackend;
use crate::builder::Mode;
use crate::future::ResponseFuture;
use crate::layer::RateLimitLayer;
use crate::limits::RateLimits;

/// Applies [`RateLimits`] to the calls of an inner service. Clones share the
/// limits (and so do all services built from one
/// [`RateLimitLayer`](crate::RateLimitLayer)).
///
/// `poll_ready` is the inner service's readiness (which quota a call needs
/// depends on the request, known only in `call`). `call` takes the tokens:
/// an admitted call goes straight to the inner service, using the readiness
/// reserved by `poll_ready`; a refused one resolves to
/// [`RateLimited`](toolwarden_core::RateLimited) without reaching it.
///
/// In [`Mode::Wait`], a call over quota reserves its own place in the
/// quotas' schedules (so waiters are admitted one per emission interval, in
/// the order they came, and never race for a token), gives up the readiness
/// `poll_ready` reserved (replacing the inner service with a clone, as tower
/// does), and waits in its response future until its place is due; only
/// then does it drive a clone of the inner service to readiness and call
/// it. A waiting call therefore never holds a `Buffer` slot or a
/// `ConcurrencyLimit` permit of the service below, and calls to other tools
/// go on meanwhile. Dropping a waiting call gives its place back.
///
/// This is why the inner service must be `Clone` (as for tower's `Buffer`
/// or `Retry`): put it behind a `tower::buffer::Buffer` if it is not.
///
/// With a [backend](crate::RateLimitBuilder::backend), `call` only prepares
/// the question; a limited call's response future asks the backend, and
/// once admitted drives a clone of the inner service to readiness and calls
/// it, in the same way.
#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    limits: RateLimits,
    /// Forwards every call untouched (see [`RateLimit::passthrough`]).
    passthrough: bool,
}

impl<S> RateLimit<S> {
    /// Limits the calls of `inner` with the quotas of `layer`, shared with
    /// every other service built from it (the same as `layer.layer(inner)`).
    pub fn new(inner: S, layer: &RateLimitLayer) -> Self {
        RateLimit {
            inner,
            limits: layer.limits(),
            passthrough: false,
        }
    }

    /// This service, forwarding every call to the inner service untouched: no
    /// quota is asked or spent. The standard stack builds this for the layer
    /// when it is left out, so that its type names each layer once.
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

    /// The limits this service applies (shared with its clones).
    #[must_use]
    pub fn limits(&self) -> &RateLimits {
        &self.limits
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

impl<S, R> Service<R> for RateLimit<S>
where
    R: McpRequest,
    S: Service<R> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, R>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, request: R) -> Self::Future {
        if self.passthrough {
            return ResponseFuture::called(self.inner.call(request));
        }
        if let Some(backend) = self.limits.backend() {
            let backend = Arc::clone(backend);
            return self.call_remote(request, backend);
        }
        let refusal = match self.limits.acquire(&request) {
            Ok(()) => return ResponseFuture::called(self.inner.call(request)),
            Err(refusal) => refusal,
        };
        if let Mode::Wait { max_wait } = self.limits.mode() {
            return self.call_waiting(request, max_wait);
        }
        ResponseFuture::refused(self.limits.reject(&request, refusal))
    }
}

impl<S> RateLimit<S> {
    /// An unready clone of the inner service for a response future that
    /// will call it later, giving up the readiness `poll_ready` reserved
    /// (dropping the ready service releases it; this handle keeps a fresh
    /// clone that must be polled ready again, as after any `call`).
    fn release_readiness(&mut self) -> S
    where
        S: Clone,
    {
        let unready = self.inner.clone();
        drop(mem::replace(&mut self.inner, unready));
        self.inner.clone()
    }

    /// `call` in `Mode::Wait` for a call the quotas refused now: reserve
    /// its place in their schedules and wait for it in the response future.
    #[inline(never)]
    fn call_waiting<R>(&mut self, request: R, max_wait: Duration) -> ResponseFuture<S, R>
    where
        R: McpRequest,
        S: Service<R> + Clone,
    {
        let now = Instant::now();
        match self
            .limits
            .reserve(&request, now, now.checked_add(max_wait))
        {
            // A token came free since the check: the call is made now.
            Some(Ok(mut reservation)) if reservation.at() <= now => {
                reservation.consume();
                ResponseFuture::called(self.inner.call(request))
            }
            Some(Ok(reservation)) => {
                let service = self.release_readiness();
                ResponseFuture::waiting(service, request, reservation)
            }
            Some(Err(refusal)) => ResponseFuture::refused(self.limits.reject(&request, refusal)),
            // Not limited (it was a moment ago, so this does not happen).
            None => ResponseFuture::called(self.inner.call(request)),
        }
    }
}

impl<S> RateLimit<S> {
    /// `call` with a backend: the decision is made in the response future.
    #[inline(never)]
    fn call_remote<R>(
        &mut self,
        request: R,
        backend: Arc<dyn RateLimitBackend>,
    ) -> ResponseFuture<S, R>
    where
        R: McpRequest,
        S: Service<R> + Clone,
    {
        let Some(acquire) = self.limits.remote_acquire(&request) else {
            return ResponseFuture::called(self.inner.call(request));
        };
        let deadline = match self.limits.mode() {
            Mode::Reject => None,
            Mode::Wait { max_wait } => Some(Instant::now().checked_add(max_wait)),
        };
        // The future drives its own clone to readiness once admitted.
        let service = self.release_readiness();
        ResponseFuture::remote(
            service,
            request,
            self.limits.clone(),
            backend,
            acquire,
            deadline,
        )
    }
}
