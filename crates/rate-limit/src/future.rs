//! [`ResponseFuture`]: the response future of [`RateLimit`](crate::RateLimit).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use toolwarden_core::{BoxError, McpRequest, RateLimited};
use tower_service::Service;

use crate::backend::{Acquire, BackendDecision, BackendFuture, RateLimitBackend};
use crate::limits::{RateLimits, Refusal, Reservation};

/// The shortest wait before a backend is asked again in `Mode::Wait`, so that
/// a backend refusing with a zero `retry_after` is not asked in a busy loop.
const MIN_REMOTE_WAIT: Duration = Duration::from_millis(1);

pin_project! {
    /// Response future of [`RateLimit`](crate::RateLimit): the inner call, a
    /// refusal, or (in [`Mode::Wait`](crate::Mode::Wait)) a wait for the
    /// call's reserved token, then for the inner service's readiness, then
    /// the inner call; with a [backend](crate::backend), the backend's
    /// decision (and waits), then readiness, then the inner call.
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
        },
        // Boxed: only calls that wait pay for the timer and the held service.
        Waiting {
            waiting: Pin<Box<Waiting<S, R>>>,
        },
        Refused {
            error: Option<RateLimited>,
        },
        // Boxed: the backend future is boxed anyway, and the local path
        // keeps the size it had.
        Remote {
            remote: Pin<Box<Remote<S, R>>>,
        },
    }
}

pin_project! {
    /// A call waiting for its backend's decision (or, in `Mode::Wait`, for
    /// the time to ask again), then for the inner service's readiness.
    struct Remote<S, R> {
        #[pin]
        phase: Phase,
        // A clone of the inner service (not yet ready) and the request.
        call: Option<(S, R)>,
        limits: RateLimits,
        backend: Arc<dyn RateLimitBackend>,
        acquire: Acquire,
        // `None` in `Mode::Reject`; in `Mode::Wait`, the deadline (`None`:
        // too far away to represent).
        deadline: Option<Option<Instant>>,
    }
}

pin_project! {
    #[project = PhaseProj]
    enum Phase {
        // In a mutex only so that the response future stays `Sync` when the
        // inner one is: it is never locked, only reached through `get_mut`.
        Deciding {
            future: Mutex<BackendFuture>,
        },
        Sleeping {
            #[pin]
            sleep: Sleep,
        },
        // Admitted: driving the inner service to readiness.
        Readying,
    }
}

pin_project! {
    /// A call with a reserved token (see [`Reservation`]): it sleeps until
    /// the token's time, then drives its clone of the inner service to
    /// readiness and calls it. Readiness is only taken once the token is
    /// due, so a waiting call never holds a place in the service below.
    struct Waiting<S, R> {
        #[pin]
        sleep: Sleep,
        slept: bool,
        // A clone of the inner service (not yet ready) and the request.
        call: Option<(S, R)>,
        reservation: Reservation,
    }
}

impl<S: Service<R>, R> ResponseFuture<S, R> {
    pub(crate) fn called(future: S::Future) -> Self {
        ResponseFuture {
            state: State::Called { future },
        }
    }

    pub(crate) fn refused(error: RateLimited) -> Self {
        ResponseFuture {
            state: State::Refused { error: Some(error) },
        }
    }

    /// A call that waits until its `reservation` is due, then until
    /// `service` (an unready clone of the inner service) is ready, then
    /// calls it.
    pub(crate) fn waiting(service: S, request: R, reservation: Reservation) -> Self {
        ResponseFuture {
            state: State::Waiting {
                waiting: Box::pin(Waiting {
                    sleep: tokio::time::sleep_until(reservation.at()),
                    slept: false,
                    call: Some((service, request)),
                    reservation,
                }),
            },
        }
    }

    /// A call that asks `backend` for `acquire`, then drives `service` (an
    /// unready clone of the inner service) to readiness and calls it;
    /// `deadline` as in [`Remote`].
    pub(crate) fn remote(
        service: S,
        request: R,
        limits: RateLimits,
        backend: Arc<dyn RateLimitBackend>,
        acquire: Acquire,
        deadline: Option<Option<Instant>>,
    ) -> Self {
        ResponseFuture {
            state: State::Remote {
                remote: Box::pin(Remote {
                    phase: Phase::Deciding {
                        future: Mutex::new(backend.acquire(&acquire)),
                    },
                    call: Some((service, request)),
                    limits,
                    backend,
                    acquire,
                    deadline,
                }),
            },
        }
    }
}

impl<S, R> Remote<S, R>
where
    R: McpRequest,
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    /// The ready service and the request once admitted, or the rejection
    /// (or the inner service's readiness error).
    fn poll_decision(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(S, R), BoxError>> {
        let mut this = self.project();
        loop {
            let future = match this.phase.as_mut().project() {
                PhaseProj::Readying => {
                    let (inner, _) = held(this.call);
                    ready!(inner.poll_ready(cx)).map_err(Into::into)?;
                    return Poll::Ready(Ok(take(this.call)));
                }
                PhaseProj::Sleeping { sleep } => {
                    ready!(sleep.poll(cx));
                    this.backend.acquire(this.acquire)
                }
                PhaseProj::Deciding { future } => {
                    let future = future.get_mut().unwrap_or_else(PoisonError::into_inner);
                    let decision = ready!(future.as_mut().poll(cx));
                    let (_, request) = held(this.call);
                    let refusal = match decision {
                        BackendDecision::Admit => None,
                        BackendDecision::Refuse { scope, retry_after } => {
                            Some(Refusal { scope, retry_after })
                        }
                        BackendDecision::DecideLocally => this.limits.acquire(&*request).err(),
                    };
                    let Some(refusal) = refusal else {
                        this.phase.set(Phase::Readying);
                        continue;
                    };
                    if let Some(deadline) = *this.deadline {
                        let wait = refusal.retry_after.max(MIN_REMOTE_WAIT);
                        if let Some(at) = retry_at(Instant::now(), wait, deadline) {
                            this.phase.set(Phase::Sleeping {
                                sleep: tokio::time::sleep_until(at),
                            });
                            continue;
                        }
                    }
                    let (inner, request) = take(this.call);
                    drop(inner);
                    return Poll::Ready(Err(this.limits.reject(&request, refusal).into()));
                }
            };
            this.phase.set(Phase::Deciding {
                future: Mutex::new(future),
            });
        }
    }
}

/// When a call refused at `now` may be checked again: `retry_after` later,
/// unless that is past `deadline`.
pub(crate) fn retry_at(
    now: Instant,
    retry_after: Duration,
    deadline: Option<Instant>,
) -> Option<Instant> {
    let at = now.checked_add(retry_after)?;
    match deadline {
        Some(deadline) if at > deadline => None,
        _ => Some(at),
    }
}

impl<S, R> Future for ResponseFuture<S, R>
where
    R: McpRequest,
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            let next = match state.as_mut().project() {
                StateProj::Called { future } => return future.poll(cx).map_err(Into::into),
                StateProj::Refused { error } => {
                    return Poll::Ready(Err(take(error).into()));
                }
                StateProj::Remote { remote } => {
                    let (mut inner, request) = ready!(remote.as_mut().poll_decision(cx))?;
                    State::Called {
                        future: inner.call(request),
                    }
                }
                StateProj::Waiting { waiting } => {
                    let waiting = waiting.as_mut().project();
                    if !*waiting.slept {
                        ready!(waiting.sleep.poll(cx));
                        *waiting.slept = true;
                    }
                    let (inner, _) = held(waiting.call);
                    // An error drops the reservation with the future: the
                    // token is given back.
                    ready!(inner.poll_ready(cx)).map_err(Into::into)?;
                    let (mut inner, request) = take(waiting.call);
                    waiting.reservation.consume();
                    State::Called {
                        future: inner.call(request),
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
            State::Remote { .. } => "Remote",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
