//! [`ResponseFuture`]: the response future of [`Coalesce`](crate::Coalesce).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::TryFuture;
use pin_project_lite::pin_project;
use toolwarden_core::jsonrpc::Id;
use toolwarden_core::{BoxError, McpResponse};

use crate::call::{Output, SharedCall};
use crate::error::SharedFailure;
use crate::inflight::{CallKey, InFlight};

/// Where a call sits in the map: to remove its slot.
struct Ticket<F: TryFuture> {
    in_flight: Arc<InFlight<F>>,
    key: CallKey,
    generation: u64,
}

/// The leader of a shared call: it made the inner call and polls it on its
/// own task. Dropped before the answer, it hands the call over to the
/// followers that wait, or drops it when nobody does.
pub(crate) struct Lead<F: TryFuture> {
    /// The inner call, boxed so that it can be handed over once polled;
    /// `None` once answered (or while it is polled).
    future: Option<Pin<Box<F>>>,
    answered: bool,
    ticket: Ticket<F>,
}

impl<F: TryFuture> Drop for Lead<F> {
    fn drop(&mut self) {
        if !self.answered {
            // `None` here: the last poll of the call panicked.
            let future = self.future.take();
            let ticket = &self.ticket;
            ticket
                .in_flight
                .abandon(&ticket.key, ticket.generation, future);
        }
    }
}

/// A follower of a shared call: it waits for the answer, or polls the call
/// once the leader handed it over.
pub(crate) struct Follow<F: TryFuture> {
    shared: Arc<SharedCall<F>>,
    place: usize,
    answered: bool,
    ticket: Ticket<F>,
}

impl<F: TryFuture> Drop for Follow<F> {
    fn drop(&mut self) {
        if !self.answered && self.shared.leave(self.place) {
            let ticket = &self.ticket;
            ticket.in_flight.remove(&ticket.key, ticket.generation);
        }
    }
}

pin_project! {
    /// Response future of [`Coalesce`](crate::Coalesce): the caller's own
    /// inner call, or its share of a call identical calls share.
    pub struct ResponseFuture<F>
    where
        F: TryFuture,
    {
        #[pin]
        state: State<F>,
        // The caller's own request id, put on its copy of the answer.
        id: Option<Id>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F>
    where
        F: TryFuture,
    {
        Direct {
            #[pin]
            future: F,
        },
        Lead {
            lead: Lead<F>,
        },
        Follow {
            follow: Follow<F>,
        },
    }
}

impl<F: TryFuture> ResponseFuture<F> {
    #[inline]
    pub(crate) fn direct(future: F) -> Self {
        ResponseFuture {
            state: State::Direct { future },
            id: None,
        }
    }

    pub(crate) fn lead(
        future: F,
        id: Option<Id>,
        in_flight: Arc<InFlight<F>>,
        key: CallKey,
        generation: u64,
    ) -> Self {
        ResponseFuture {
            state: State::Lead {
                lead: Lead {
                    future: Some(Box::pin(future)),
                    answered: false,
                    ticket: Ticket {
                        in_flight,
                        key,
                        generation,
                    },
                },
            },
            id,
        }
    }

    pub(crate) fn follow(
        shared: Arc<SharedCall<F>>,
        place: usize,
        id: Option<Id>,
        in_flight: Arc<InFlight<F>>,
        key: CallKey,
        generation: u64,
    ) -> Self {
        ResponseFuture {
            state: State::Follow {
                follow: Follow {
                    shared,
                    place,
                    answered: false,
                    ticket: Ticket {
                        in_flight,
                        key,
                        generation,
                    },
                },
            },
            id,
        }
    }
}

/// One caller's copy of the answer: its own id on a response, an
/// equivalent error for a failure.
fn answer<R: McpResponse>(output: Result<R, SharedFailure>, id: Option<&Id>) -> Result<R, BoxError> {
    match output {
        Ok(mut response) => {
            if let Some(id) = id {
                response.set_request_id(id);
            }
            Ok(response)
        }
        Err(failure) => Err(failure.to_error()),
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: TryFuture,
    F::Error: Into<BoxError>,
    F::Ok: McpResponse + Clone,
{
    type Output = Result<F::Ok, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.state.project() {
            StateProj::Direct { future } => future.try_poll(cx).map_err(Into::into),
            StateProj::Lead { lead } => {
                // Taken while polled: if the poll panics, the call is
                // dropped as the panic unwinds, and the leader's leaving
                // tells the followers.
                let Some(mut future) = lead.future.take() else {
                    polled_after_completion()
                };
                let output = match future.as_mut().try_poll(cx) {
                    Poll::Pending => {
                        lead.future = Some(future);
                        return Poll::Pending;
                    }
                    Poll::Ready(output) => output,
                };
                lead.answered = true;
                drop(future);
                let output: Output<F> = output.map_err(|e| SharedFailure::new(e.into()));
                let ticket = &lead.ticket;
                if let Some(shared) = ticket.in_flight.finish(&ticket.key, ticket.generation) {
                    shared.complete(|| output.clone());
                }
                Poll::Ready(answer(output, this.id.as_ref()))
            }
            StateProj::Follow { follow } => {
                if follow.answered {
                    polled_after_completion()
                }
                let answered = match follow.shared.poll_follower(follow.place, cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(answered) => answered,
                };
                follow.answered = true;
                if answered.completed_here {
                    let ticket = &follow.ticket;
                    ticket.in_flight.remove(&ticket.key, ticket.generation);
                }
                Poll::Ready(answer(answered.output, this.id.as_ref()))
            }
        }
    }
}

#[cold]
#[allow(clippy::panic)]
fn polled_after_completion() -> ! {
    panic!("ResponseFuture polled after completion")
}

impl<F: TryFuture> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Direct { .. } => "Direct",
            State::Lead { .. } => "Lead",
            State::Follow { .. } => "Follow",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
