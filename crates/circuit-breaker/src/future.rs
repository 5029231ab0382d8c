//! [`ResponseFuture`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use toolwarden_core::{BoxError, CallKind, CircuitOpen, Classify, Entry};

use crate::breaker::{Breaker, Ticket};

/// An admitted call's claim on its breaker: records the outcome when the
/// call ends, and gives a half-open probe's place back if it is dropped
/// before that (a dropped call counts as neither success nor failure).
pub(crate) struct Tracked {
    breaker: Entry<Breaker>,
    ticket: Ticket,
    kind: CallKind,
    done: bool,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if !self.done && self.ticket.is_probe() {
            self.breaker.release(self.ticket);
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called {
            #[pin]
            future: F,
            tracked: Option<Tracked>,
        },
        Refused {
            error: Option<CircuitOpen>,
        },
    }
}

pin_project! {
    /// Response future of [`CircuitBreaker`](crate::CircuitBreaker): the
    /// inner call, whose outcome is recorded when it completes, or a refusal.
    ///
    /// # Panics
    ///
    /// A refusal panics if it is polled again after it returned `Ready`.
    pub struct ResponseFuture<F, C> {
        #[pin]
        state: State<F>,
        classifier: C,
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn tracked(
        future: F,
        breaker: Entry<Breaker>,
        ticket: Ticket,
        kind: CallKind,
        classifier: C,
    ) -> Self {
        ResponseFuture {
            state: State::Called {
                future,
                tracked: Some(Tracked {
                    breaker,
                    ticket,
                    kind,
                    done: false,
                }),
            },
            classifier,
        }
    }

    pub(crate) fn untracked(future: F, classifier: C) -> Self {
        ResponseFuture {
            state: State::Called {
                future,
                tracked: None,
            },
            classifier,
        }
    }

    pub(crate) fn refused(error: CircuitOpen, classifier: C) -> Self {
        ResponseFuture {
            state: State::Refused { error: Some(error) },
            classifier,
        }
    }
}

impl<F, C> fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Called {
                tracked: Some(_), ..
            } => "called",
            State::Called { tracked: None, .. } => "called (untracked)",
            State::Refused { .. } => "refused",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<F, T, E, C> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<T>,
{
    type Output = Result<T, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.state.project() {
            StateProj::Called { future, tracked } => {
                let mut result = match future.poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(result) => result.map_err(Into::into),
                };
                if let Some(mut tracked) = tracked.take() {
                    let outcome = this.classifier.classify_result(tracked.kind, &mut result);
                    tracked.done = true;
                    tracked.breaker.complete(tracked.ticket, &outcome);
                }
                Poll::Ready(result)
            }
            StateProj::Refused { error } => match error.take() {
                Some(error) => Poll::Ready(Err(Box::new(error))),
                None => panic!("ResponseFuture polled after completion"),
            },
        }
    }
}
