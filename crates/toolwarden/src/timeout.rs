//! The standard stack's attempt timeout.
//!
//! It does what `tower::timeout::Timeout` does, and errs with the same
//! [`Elapsed`], which every layer above classifies as a timeout. Two
//! things differ, because it runs once per attempt of every call:
//!
//! - Its deadline is taken from the call's shared clock reading
//!   ([`toolwarden_core::time`]), not from a reading of its own.
//! - Its timer is armed only when the attempt does not finish at once.
//!   Arming a timer registers with the runtime's timer wheel; a cached or
//!   in-process answer never needs one.
//! - The timer is boxed when armed. This future is the innermost of the
//!   stack's, moved by every layer above on every call: inline, the timer
//!   (a `Sleep`, 96 bytes) would be moved ten times per call whether it
//!   is armed or not. An attempt that waits (any call over a network)
//!   makes one allocation for it, next to the timer wheel's registration.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use toolwarden_core::BoxError;
use tower::timeout::error::Elapsed;
use tower_service::Service;

/// Fails an attempt that takes longer than its timeout with [`Elapsed`].
#[derive(Debug, Clone)]
pub struct AttemptTimeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S> AttemptTimeout<S> {
    /// `inner`, whose attempts fail with [`Elapsed`] after `timeout`.
    pub fn new(inner: S, timeout: Duration) -> Self {
        AttemptTimeout { inner, timeout }
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

impl<S, R> Service<R> for AttemptTimeout<S>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = AttemptTimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        // A timeout too long to add to the clock never elapses.
        let deadline = toolwarden_core::time::now().checked_add(self.timeout);
        AttemptTimeoutFuture {
            inner: self.inner.call(request),
            deadline,
            sleep: None,
        }
    }
}

pin_project! {
    /// The response future of [`AttemptTimeout`].
    pub struct AttemptTimeoutFuture<F> {
        #[pin]
        inner: F,
        deadline: Option<Instant>,
        sleep: Option<Pin<Box<Sleep>>>,
    }
}

impl<F> std::fmt::Debug for AttemptTimeoutFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttemptTimeoutFuture")
            .field("deadline", &self.deadline)
            .field("armed", &self.sleep.is_some())
            .finish_non_exhaustive()
    }
}

impl<F, T, E> Future for AttemptTimeoutFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result.map_err(Into::into));
        }
        let Some(deadline) = *this.deadline else {
            return Poll::Pending;
        };
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        ready!(sleep.as_mut().poll(cx));
        Poll::Ready(Err(Elapsed::new().into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::{pending, ready};
    use tower::ServiceExt;

    #[tokio::test(start_paused = true)]
    async fn an_answer_in_time_passes_and_a_late_one_elapses() {
        let quick = tower::service_fn(|n: u32| ready(Ok::<_, BoxError>(n + 1)));
        let mut service = AttemptTimeout::new(quick, Duration::from_secs(1));
        assert_eq!(service.ready().await.unwrap().call(1).await.unwrap(), 2);

        let slow = tower::service_fn(|n: u32| async move {
            tokio::time::sleep(Duration::from_millis(999)).await;
            Ok::<_, BoxError>(n)
        });
        let mut service = AttemptTimeout::new(slow, Duration::from_secs(1));
        assert_eq!(service.ready().await.unwrap().call(7).await.unwrap(), 7);

        let hung = tower::service_fn(|_: u32| pending::<Result<u32, BoxError>>());
        let mut service = AttemptTimeout::new(hung, Duration::from_secs(1));
        let started = Instant::now();
        let error = service.ready().await.unwrap().call(0).await.unwrap_err();
        assert!(error.is::<Elapsed>(), "{error}");
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_counts_from_the_call_not_from_the_first_poll() {
        let hung = tower::service_fn(|_: u32| pending::<Result<u32, BoxError>>());
        let mut service = AttemptTimeout::new(hung, Duration::from_secs(1));
        let future = service.ready().await.unwrap().call(0);
        tokio::time::advance(Duration::from_millis(600)).await;
        let polled = Instant::now();
        assert!(future.await.unwrap_err().is::<Elapsed>());
        assert_eq!(polled.elapsed(), Duration::from_millis(400));
    }

    #[test]
    fn the_timer_is_not_inline() {
        type Inner = std::future::Ready<Result<[u8; 64], BoxError>>;
        let added =
            std::mem::size_of::<AttemptTimeoutFuture<Inner>>() - std::mem::size_of::<Inner>();
        // The deadline and the boxed timer's pointer, not a `Sleep`.
        assert!(added <= 24, "{added} bytes added");
        assert!(std::mem::size_of::<Sleep>() > 24);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_past_the_clocks_range_never_elapses() {
        let slow = tower::service_fn(|n: u32| async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, BoxError>(n)
        });
        let mut service = AttemptTimeout::new(slow, Duration::MAX);
        assert_eq!(service.ready().await.unwrap().call(3).await.unwrap(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn inner_errors_pass_through() {
        let failing =
            tower::service_fn(|_: u32| ready(Err::<u32, BoxError>("upstream gone".into())));
        let mut service = AttemptTimeout::new(failing, Duration::from_secs(1));
        let error = service.ready().await.unwrap().call(0).await.unwrap_err();
        assert_eq!(error.to_string(), "upstream gone");
    }
}
