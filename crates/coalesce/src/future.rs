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

use crate::call::SharedCall;
use crate::error::SharedFailure;

/// A follower's own call, made should the shared call answer with a task
/// (a task is its creator's: its id is no answer for another caller).
pub(crate) type Recall<T> =
    Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>> + Send>;

/// A caller of a shared call: it polls the call, or waits for the answer.
/// Dropped before the answer, it leaves the call, which the last caller to
/// leave drops.
pub(crate) struct Waiter<F: TryFuture> {
    /// `None` once answered.
    call: Option<Arc<SharedCall<F>>>,
    place: usize,
}

impl<F: TryFuture> Drop for Waiter<F> {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            call.leave(self.place);
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
        // A follower's own request id, put on its copy of the answer (the
        // leader's answer carries the leader's id already).
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
        Shared {
            waiter: Waiter<F>,
            // A follower's own call, for a task answer (the leader has none).
            recall: Option<Recall<F::Ok>>,
        },
        Recalled {
            future: Pin<Box<dyn Future<Output = Result<F::Ok, BoxError>> + Send>>,
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

    pub(crate) fn shared(
        call: Arc<SharedCall<F>>,
        place: usize,
        id: Option<Id>,
        recall: Option<Recall<F::Ok>>,
    ) -> Self {
        ResponseFuture {
            state: State::Shared {
                waiter: Waiter {
                    call: Some(call),
                    place,
                },
                recall,
            },
            id,
        }
    }
}

/// One caller's copy of the answer: its own id on a response, an
/// equivalent error for a failure.
fn copy_for<R: McpResponse>(
    output: Result<R, SharedFailure>,
    id: Option<&Id>,
) -> Result<R, BoxError> {
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
        let mut this = self.project();
        let recalled = match this.state.as_mut().project() {
            StateProj::Direct { future } => return future.try_poll(cx).map_err(Into::into),
            StateProj::Recalled { future } => return future.as_mut().poll(cx),
            StateProj::Shared { waiter, recall } => {
                let Some(call) = waiter.call.as_ref() else {
                    polled_after_completion()
                };
                let output = match call.poll(waiter.place, cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(output) => output,
                };
                // Answered: this caller holds the call no more (its slot in
                // the map stays, closed, for the next call with its key).
                waiter.call = None;
                match (output, recall.take()) {
                    // The server made a task of the call, or asks its caller
                    // for input (with a `requestState` that is that
                    // caller's): the leader's.
                    (Ok(response), Some(recall))
                        if response.is_task() || response.is_input_required() =>
                    {
                        recall()
                    }
                    (output, _) => return Poll::Ready(copy_for(output, this.id.as_ref())),
                }
            }
        };
        this.state.set(State::Recalled { future: recalled });
        match this.state.project() {
            StateProj::Recalled { future } => future.as_mut().poll(cx),
            _ => polled_after_completion(),
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
            State::Shared { .. } => "Shared",
            State::Recalled { .. } => "Recalled",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
