//! [`ResponseFuture`]: the response future of [`Bulkhead`](crate::Bulkhead).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::sync::{AcquireError, OwnedSemaphorePermit};
use tokio::time::{Instant, Sleep};
use toolwarden_core::{BoxError, BulkheadFull};
use tower_service::Service;

use crate::state::{Compartment, Shared};

/// A place taken by one call: given back when dropped (the call completed,
/// failed, or was cancelled); a call that completes also records its
/// duration.
pub(crate) struct Permit {
    compartment: Arc<Compartment>,
    started: Instant,
}

impl Permit {
    #[inline]
    pub(crate) fn new(compartment: Arc<Compartment>) -> Self {
        Permit {
            compartment,
            started: Instant::now(),
        }
    }

    /// The call ended: record how long it took (the place is given back
    /// when the permit drops).
    #[inline]
    fn complete(self) {
        self.compartment.record(self.started.elapsed());
    }
}

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        self.compartment.leave();
    }
}

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

pin_project! {
    /// Response future of [`Bulkhead`](crate::Bulkhead): the inner call
    /// holding its place, a refusal, or a wait for a place, then for the
    /// inner service's readiness, then the inner call.
    pub struct ResponseFuture<S, R>
    where
        S: Service<R>,
    {
        #[pin]
        state: State<S, R>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, R>
    where
        S: Service<R>,
    {
        Called {
            #[pin]
            future: S::Future,
            permit: Option<Permit>,
        },
        // Boxed: only calls that wait pay for the timer and the held service.
        Waiting {
            waiting: Pin<Box<Waiting<S, R>>>,
        },
        Refused {
            error: Option<BulkheadFull>,
        },
    }
}

pin_project! {
    struct Waiting<S, R> {
        // In a mutex only so that the response future stays `Sync` when the
        // inner one is: never locked, only reached through `get_mut`.
        acquire: Mutex<Acquire>,
        #[pin]
        deadline: Option<Sleep>,
        permit: Option<Permit>,
        // A clone of the inner service (not yet ready) and the request.
        call: Option<(S, R)>,
        compartment: Arc<Compartment>,
        key: Arc<str>,
        shared: Arc<Shared>,
    }
}

impl<S: Service<R>, R> ResponseFuture<S, R> {
    #[inline]
    pub(crate) fn called(future: S::Future, permit: Option<Permit>) -> Self {
        ResponseFuture {
            state: State::Called { future, permit },
        }
    }

    pub(crate) fn refused(error: BulkheadFull) -> Self {
        ResponseFuture {
            state: State::Refused { error: Some(error) },
        }
    }

    pub(crate) fn waiting(
        service: S,
        request: R,
        compartment: Arc<Compartment>,
        key: Arc<str>,
        shared: Arc<Shared>,
        max_wait: Duration,
    ) -> Self {
        let semaphore = Arc::clone(&compartment.semaphore);
        ResponseFuture {
            state: State::Waiting {
                waiting: Box::pin(Waiting {
                    acquire: Mutex::new(Box::pin(semaphore.acquire_owned())),
                    // `None`: too far away to represent, wait as long as it takes.
                    deadline: Instant::now()
                        .checked_add(max_wait)
                        .map(tokio::time::sleep_until),
                    permit: None,
                    call: Some((service, request)),
                    compartment,
                    key,
                    shared,
                }),
            },
        }
    }
}

impl<S, R> Waiting<S, R>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    /// The ready service, the request and the place, or the refusal.
    fn poll_place(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(S, R, Permit), BoxError>> {
        let mut this = self.project();
        if this.permit.is_none() {
            let acquire = this
                .acquire
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner);
            match acquire.as_mut().poll(cx) {
                Poll::Ready(Ok(permit)) => {
                    // Given back by `Permit`'s drop.
                    permit.forget();
                    *this.permit = Some(Permit::new(Arc::clone(this.compartment)));
                }
                // The semaphore is never closed; treat it as full.
                Poll::Ready(Err(_)) | Poll::Pending => {
                    let expired = match this.deadline.as_mut().as_pin_mut() {
                        Some(deadline) => deadline.poll(cx).is_ready(),
                        None => false,
                    };
                    if !expired {
                        return Poll::Pending;
                    }
                    let refusal = this.shared.reject(this.key, this.compartment);
                    return Poll::Ready(Err(refusal.into()));
                }
            }
        }
        let (inner, _) = held(this.call);
        // An error drops the permit with the future: the place is given back.
        ready!(inner.poll_ready(cx)).map_err(Into::into)?;
        let (inner, request) = take(this.call);
        Poll::Ready(Ok((inner, request, take(this.permit))))
    }
}

impl<S, R> Future for ResponseFuture<S, R>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            let next = match state.as_mut().project() {
                StateProj::Called { future, permit } => {
                    let output = ready!(future.poll(cx));
                    if let Some(permit) = permit.take() {
                        permit.complete();
                    }
                    return Poll::Ready(output.map_err(Into::into));
                }
                StateProj::Refused { error } => return Poll::Ready(Err(take(error).into())),
                StateProj::Waiting { waiting } => {
                    let (mut inner, request, permit) = ready!(waiting.as_mut().poll_place(cx))?;
                    State::Called {
                        future: inner.call(request),
                        permit: Some(permit),
                    }
                }
            };
            state.set(next);
        }
    }
}

/// Takes what a state holds until it completes.
///
/// Invariant: a state's `Option` is only emptied when the future completes or
/// changes state, and a future is not polled after it returned `Ready`.
#[allow(clippy::expect_used)]
fn take<T>(slot: &mut Option<T>) -> T {
    slot.take().expect("ResponseFuture polled after completion")
}

/// What a state holds until it completes, in place (same invariant as [`take`]).
#[allow(clippy::expect_used)]
fn held<T>(slot: &mut Option<T>) -> &mut T {
    slot.as_mut()
        .expect("ResponseFuture polled after completion")
}

impl<S: Service<R>, R> fmt::Debug for ResponseFuture<S, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Called { .. } => "Called",
            State::Waiting { .. } => "Waiting",
            State::Refused { .. } => "Refused",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
