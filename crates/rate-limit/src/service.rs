//! [`RateLimit`]: the service built by [`RateLimitLayer`](crate::RateLimitLayer).

use std::mem;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::time::Instant;
use toolwarden_core::{BoxError, McpRequest};
use tower_service::Service;

use crate::backend::RateLimitBackend;
use crate::future::{retry_at, ResponseFuture};
use crate::layer::Mode;
use crate::limits::RateLimits;

/// Applies [`RateLimits`] to the calls of an inner service. Clones share the
/// limits.
///
/// `poll_ready` is the inner service's readiness (which quota a call needs
/// depends on the request, known only in `call`). `call` takes the tokens:
/// an admitted call goes straight to the inner service; a refused one
/// resolves to [`RateLimited`](toolwarden_core::RateLimited) without reaching
/// it, or, in [`Mode::Wait`], waits in the response future holding the
/// ready inner service (swapped for a clone, as tower does).
///
/// With a [backend](crate::RateLimitBuilder::backend), `call` only prepares
/// the question; a limited call's response future asks the backend, holding
/// the ready inner service the same way, and calls it once admitted.
#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    limits: RateLimits,
}

impl<S> RateLimit<S> {
    /// Limits the calls of `inner` with `limits`.
    pub fn new(inner: S, limits: RateLimits) -> Self {
        RateLimit { inner, limits }
    }

    /// The limits this service applies (shared with its clones).
    pub fn limits(&self) -> &RateLimits {
        &self.limits
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the service, returning the inner one.
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
        if let Some(backend) = self.limits.backend() {
            let backend = Arc::clone(backend);
            return self.call_remote(request, backend);
        }
        let refusal = match self.limits.acquire(&request) {
            Ok(()) => return ResponseFuture::called(self.inner.call(request)),
            Err(refusal) => refusal,
        };
        if let Mode::Wait { max_wait } = self.limits.mode() {
            let now = Instant::now();
            let deadline = now.checked_add(max_wait);
            if let Some(at) = retry_at(now, refusal.retry_after, deadline) {
                // The ready service goes into the future; this handle keeps a
                // clone that must be polled ready again.
                let clone = self.inner.clone();
                let ready = mem::replace(&mut self.inner, clone);
                let limits = self.limits.clone();
                return ResponseFuture::waiting(ready, request, limits, at, deadline);
            }
        }
        ResponseFuture::refused(self.limits.reject(&request, refusal))
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
        // The ready service goes into the future, as in `Mode::Wait`.
        let clone = self.inner.clone();
        let ready = mem::replace(&mut self.inner, clone);
        ResponseFuture::remote(
            ready,
            request,
            self.limits.clone(),
            backend,
            acquire,
            deadline,
        )
    }
}
