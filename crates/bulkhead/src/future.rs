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
use toolwarden_core::{BoxError, BulkheadFull, CallKind, Classify, McpClassifier, Outcome};
use tower_service::Service;

use crate::adaptive::{AdaptiveCap, Signal};
use crate::state::{Compartment, Shared};

/// A place taken by one call: given back when dropped (the call completed,
/// failed, or was cancelled); a call that completes also records its
/// duration. With an adaptive cap, the end of the call also adapts it.
pub(crate) struct Permit {
    compartment: Arc<Compartment>,
    started: Instant,
    /// The adaptive cap's epoch at admission (0 for a fixed cap).
    epoch: u64,
    /// What the call's end says about the load, once it ended (adaptive
    /// caps only; `None` at drop: cancelled).
    signal: Option<Signal>,
}

impl Permit {
    #[inline]
    pub(crate) fn new(compartment: Arc<Compartment>) -> Self {
        let epoch = compartment.adaptive.as_ref().map_or(0, |a| a.epoch());
        Permit {
            compartment,
            started: Instant::now(),
            epoch,
            signal: None,
        }
    }

    /// The call ended: record how long it took (the place is given back
    /// when the permit drops).
    #[inline]
    fn complete(self) {
        self.compartment.record(self.started.elapsed());
    }

    /// The call of an adaptive key ended with `outcome`: record how long
    /// it took and what that says about the load (acted on at drop).
    fn complete_with(mut self, outcome: &Outcome) {
        let elapsed = self.started.elapsed();
        self.compartment.record(elapsed);
        if let Some(adaptive) = &self.compartment.adaptive {
            self.signal = Some(adaptive.bounds.signal(Some(outcome), elapsed));
        }
    }
}

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        match &self.compartment.adaptive {
            None => self.compartment.leave(),
            Some(adaptive) => {
                let signal = self.signal.unwrap_or_else(|| {
                    // Cancelled: only its duration so far says anything.
                    adaptive.bounds.signal(None, self.started.elapsed())
                });
                adaptive.leave(&self.compartment.semaphore, signal, self.epoch);
            }
        }
    }
}

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

pin_project! {
    /// Response future of [`Bulkhead`](crate::Bulkhead): the inner call
    /// holding its place, a refusal, or a wait for a place, then for the
    /// inner service's readiness, then the inner call.
    pub struct ResponseFuture<S, R, C = McpClassifier>
    where
        S: Service<R>,
    {
        #[pin]
        state: State<S, R, C>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, R, C>
    where
        S: Service<R>,
    {
        Called {
            #[pin]
            future: S::Future,
            permit: Option<Permit>,
            // Only for a call of an adaptive key: its outcome adapts the cap.
            classifier: Option<C>,
        },
        // Boxed: only calls that wait pay for the timer and the held service.
        Waiting {
            waiting: Pin<Box<Waiting<S, R, C>>>,
        },
        Refused {
            error: Option<BulkheadFull>,
        },
    }
}

pin_project! {
    struct Waiting<S, R, C> {
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
        // What a refusal calls the key (`KeyRef::subject`).
        subject: String,
        shared: Arc<Shared>,
        classifier: Option<C>,
    }
}

impl<S: Service<R>, R, C> ResponseFuture<S, R, C> {
    #[inline]
    pub(crate) fn called(future: S::Future, permit: Option<Permit>, classifier: Option<C>) -> Self {
        ResponseFuture {
            state: State::Called {
                future,
                permit,
                classifier,
            },
        }
    }

    pub(crate) fn refused(error: BulkheadFull) -> Self {
        ResponseFuture {
            state: State::Refused { error: Some(error) },
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn waiting(
        service: S,
        request: R,
        compartment: Arc<Compartment>,
        (key, subject): (Arc<str>, String),
        shared: Arc<Shared>,
        max_wait: Duration,
        classifier: Option<C>,
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
                    subject,
                    shared,
                    classifier,
                }),
            },
        }
    }
}

impl<S, R, C> Waiting<S, R, C>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    /// The ready service, the request, the place and the classifier (for
    /// an adaptive key), or the refusal.
    #[allow(clippy::type_complexity)]
    fn poll_place(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(S, R, Permit, Option<C>), BoxError>> {
        let mut this = self.project();
        while this.permit.is_none() {
            let acquire = this
                .acquire
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner);
            match acquire.as_mut().poll(cx) {
                Poll::Ready(Ok(permit)) => {
                    // Given back by `Permit`'s drop.
                    permit.forget();
                    let enter = this
                        .compartment
                        .adaptive
                        .as_ref()
                        .is_none_or(AdaptiveCap::may_enter_with_handed_permit);
                    if enter {
                        *this.permit = Some(Permit::new(Arc::clone(this.compartment)));
                    } else {
                        // The permit paid the debt of a cut made after it was
                        // handed over: wait for another.
                        *acquire =
                            Box::pin(Arc::clone(&this.compartment.semaphore).acquire_owned());
                    }
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
                    let subject = std::mem::take(this.subject);
                    let refusal = this.shared.reject(this.key, subject, this.compartment);
                    return Poll::Ready(Err(refusal.into()));
                }
            }
        }
        let (inner, _) = held(this.call);
        // An error drops the permit with the future: the place is given back.
        ready!(inner.poll_ready(cx)).map_err(Into::into)?;
        let (inner, request) = take(this.call);
        Poll::Ready(Ok((
            inner,
            request,
            take(this.permit),
            this.classifier.take(),
        )))
    }
}

impl<S, R, C> Future for ResponseFuture<S, R, C>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            let next = match state.as_mut().project() {
                StateProj::Called {
                    future,
                    permit,
                    classifier,
                } => {
                    let mut output = ready!(future.poll(cx)).map_err(Into::into);
                    if let Some(permit) = permit.take() {
                        match classifier.take() {
                            None => permit.complete(),
                            Some(classifier) => {
                                let outcome =
                                    classifier.classify_result(CallKind::ToolCall, &mut output);
                                permit.complete_with(&outcome);
                            }
                        }
                    }
                    return Poll::Ready(output);
                }
                StateProj::Refused { error } => return Poll::Ready(Err(take(error).into())),
                StateProj::Waiting { waiting } => {
                    let (mut inner, request, permit, classifier) =
                        ready!(waiting.as_mut().poll_place(cx))?;
                    State::Called {
                        future: inner.call(request),
                        permit: Some(permit),
                        classifier,
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

impl<S: Service<R>, R, C> fmt::Debug for ResponseFuture<S, R, C> {
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
