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
use crate::limits::{RateLimits, Refusal};

/// The shortest wait before a backend is asked again in `Mode::Wait`, so that
/// a backend refusing with a zero `retry_after` is not asked in a busy loop.
const MIN_REMOTE_WAIT: Duration = Duration::from_millis(1);

pin_project! {
    /// Response future of [`RateLimit`](crate::RateLimit): the inner call, a
    /// refusal, or (in [`Mode::Wait`](crate::Mode::Wait)) a wait for a token
    /// followed by the inner call; with a [backend](crate::backend), the
    /// backend's decision (and waits) followed by the inner call.
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
    /// the time to ask again).
    struct Remote<S, R> {
        #[pin]
        phase: Phase,
        // The ready inner service and the request.
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
    }
}

pin_project! {
    struct Waiting<S, R> {
        #[pin]
        sleep: Sleep,
        // The ready inner service and the request.
        call: Option<(S, R)>,
        limits: RateLimits,
        deadline: Option<Instant>,
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

    /// A call that waits until `retry_at`, then re-checks `limits`, until
    /// admitted or past `deadline` (`None`: too far away to represent).
    pub(crate) fn waiting(
        ready: S,
        request: R,
        limits: RateLimits,
        retry_at: Instant,
        deadline: Option<Instant>,
    ) -> Self {
        ResponseFuture {
            state: State::Waiting {
                waiting: Box::pin(Waiting {
                    sleep: tokio::time::sleep_until(retry_at),
                    call: Some((ready, request)),
                    limits,
                    deadline,
                }),
            },
        }
    }
}

impl<S: Service<R>, R> ResponseFuture<S, R> {
    /// A call that asks `backend` for `acquire` before calling `ready`;
    /// `deadline` as in [`Remote`].
    pub(crate) fn remote(
        ready: S,
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
                    call: Some((ready, request)),
                    limits,
                    backend,
                    acquire,
                    deadline,
                }),
            },
        }
    }
}

impl<S, R: McpRequest> Remote<S, R> {
    /// The ready service and the request once admitted, or the rejection.
    fn poll_decision(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(S, R), RateLimited>> {
        let mut this = self.project();
        loop {
            let future = match this.phase.as_mut().project() {
                PhaseProj::Sleeping { sleep } => {
                    ready!(sleep.poll(cx));
                    this.backend.acquire(this.acquire)
                }
                PhaseProj::Deciding { future } => {
                    let future = future.get_mut().unwrap_or_else(PoisonError::into_inner);
                    let decision = ready!(future.as_mut().poll(cx));
                    let (inner, request) = take(this.call);
                    let refusal = match decision {
                        BackendDecision::Admit => return Poll::Ready(Ok((inner, request))),
                        BackendDecision::Refuse { scope, retry_after } => {
                            Refusal { scope, retry_after }
                        }
                        BackendDecision::DecideLocally => match this.limits.acquire(&request) {
                            Ok(()) => return Poll::Ready(Ok((inner, request))),
                            Err(refusal) => refusal,
                        },
                    };
                    if let Some(deadline) = *this.deadline {
                        let wait = refusal.retry_after.max(MIN_REMOTE_WAIT);
                        if let Some(at) = retry_at(Instant::now(), wait, deadline) {
                            *this.call = Some((inner, request));
                            this.phase.set(Phase::Sleeping {
                                sleep: tokio::time::sleep_until(at),
                            });
                            continue;
                        }
                    }
                    drop(inner);
                    return Poll::Ready(Err(this.limits.reject(&request, refusal)));
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
                StateProj::Remote { remote } => match ready!(remote.as_mut().poll_decision(cx)) {
                    Ok((mut inner, request)) => State::Called {
                        future: inner.call(request),
                    },
                    Err(rejection) => State::Refused {
                        error: Some(rejection),
                    },
                },
                StateProj::Waiting { waiting } => {
                    let mut waiting = waiting.as_mut().project();
                    ready!(waiting.sleep.as_mut().poll(cx));
                    // Put back below unless the state changes.
                    let (mut inner, request) = take(waiting.call);
                    match waiting.limits.acquire(&request) {
                        Ok(()) => State::Called {
                            future: inner.call(request),
                        },
                        Err(refusal) => {
                            let now = Instant::now();
                            match retry_at(now, refusal.retry_after, *waiting.deadline) {
                                Some(at) => {
                                    // Another call took the token first: wait again.
                                    waiting.sleep.as_mut().reset(at);
                                    *waiting.call = Some((inner, request));
                                    continue;
                                }
                                None => State::Refused {
                                    error: Some(waiting.limits.reject(&request, refusal)),
                                },
                            }
                        }
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
