//! [`ResponseFuture`]: the response future of [`Coalesce`](crate::Coalesce).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures_util::future::Shared;
use futures_util::TryFuture;
use pin_project_lite::pin_project;
use toolwarden_core::jsonrpc::Id;
use toolwarden_core::{BoxError, McpResponse};

use crate::error::SharedFailure;
use crate::inflight::{CallKey, Leave};

pin_project! {
    /// The inner call that identical calls share: its output, with the
    /// failure made shareable.
    pub struct Lead<F> {
        #[pin]
        future: F,
    }
}

impl<F> Lead<F> {
    pub(crate) fn new(future: F) -> Self {
        Lead { future }
    }
}

impl<F> Future for Lead<F>
where
    F: TryFuture,
    F::Error: Into<BoxError>,
{
    type Output = Result<F::Ok, SharedFailure>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let output = ready!(self.project().future.try_poll(cx));
        Poll::Ready(output.map_err(|e| SharedFailure::new(e.into())))
    }
}

impl<F> fmt::Debug for Lead<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lead").finish_non_exhaustive()
    }
}

/// One caller's place in a shared call: leaving removes the call from the
/// map when it completed or when this was its last waiter.
pub(crate) struct Ticket {
    pub(crate) in_flight: Arc<dyn Leave>,
    pub(crate) key: CallKey,
    pub(crate) generation: u64,
    pub(crate) completed: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.in_flight
            .leave(&self.key, self.generation, self.completed);
    }
}

pin_project! {
    /// Response future of [`Coalesce`](crate::Coalesce): the caller's own
    /// inner call, or its share of a call identical calls share.
    pub struct ResponseFuture<F>
    where
        F: TryFuture,
        F::Error: Into<BoxError>,
    {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F>
    where
        F: TryFuture,
        F::Error: Into<BoxError>,
    {
        Direct {
            #[pin]
            future: F,
        },
        Shared {
            #[pin]
            shared: Shared<Lead<F>>,
            // The caller's own request id, put on its copy of the answer.
            id: Option<Id>,
            ticket: Option<Ticket>,
        },
    }
}

impl<F> ResponseFuture<F>
where
    F: TryFuture,
    F::Error: Into<BoxError>,
{
    #[inline]
    pub(crate) fn direct(future: F) -> Self {
        ResponseFuture {
            state: State::Direct { future },
        }
    }

    pub(crate) fn shared(shared: Shared<Lead<F>>, id: Option<Id>, ticket: Ticket) -> Self {
        ResponseFuture {
            state: State::Shared {
                shared,
                id,
                ticket: Some(ticket),
            },
        }
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
        match self.project().state.project() {
            StateProj::Direct { future } => future.try_poll(cx).map_err(Into::into),
            StateProj::Shared { shared, id, ticket } => {
                let output = ready!(shared.poll(cx));
                if let Some(mut ticket) = ticket.take() {
                    // The answer is out: a new identical call makes a new call.
                    ticket.completed = true;
                }
                Poll::Ready(match output {
                    Ok(mut response) => {
                        if let Some(id) = id.as_ref() {
                            response.set_request_id(id);
                        }
                        Ok(response)
                    }
                    Err(failure) => Err(failure.to_error()),
                })
            }
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F>
where
    F: TryFuture,
    F::Error: Into<BoxError>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Direct { .. } => "Direct",
            State::Shared { .. } => "Shared",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
