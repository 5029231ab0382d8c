//! The response future of [`FallbackCache`](crate::FallbackCache).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use toolwarden_core::{BoxError, Classify, McpResponse};

use crate::fallback::CallContext;

pin_project! {
    /// Response future of [`FallbackCache`](crate::FallbackCache): the inner
    /// call, finished by storing, serving stale or degrading; or an answer
    /// taken from the cache without calling.
    pub struct ResponseFuture<F, T, C> {
        #[pin]
        state: State<F, T>,
        // `None` for calls the layer does not handle (not a `tools/call`).
        context: Option<CallContext<C>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, T> {
        Called {
            #[pin]
            future: F,
        },
        Answered {
            response: Option<T>,
        },
    }
}

impl<F, T, C> ResponseFuture<F, T, C> {
    pub(crate) fn called(future: F, context: CallContext<C>) -> Self {
        ResponseFuture {
            state: State::Called { future },
            context: Some(context),
        }
    }

    pub(crate) fn passthrough(future: F) -> Self {
        ResponseFuture {
            state: State::Called { future },
            context: None,
        }
    }

    pub(crate) fn answered(response: T) -> Self {
        ResponseFuture {
            state: State::Answered {
                response: Some(response),
            },
            context: None,
        }
    }
}

impl<F, T, E, C> Future for ResponseFuture<F, T, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    T: McpResponse + Clone + Send + Sync + 'static,
    C: Classify<T>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.state.project() {
            StateProj::Answered { response } => {
                // Invariant: a future is not polled again after it returned `Ready`.
                #[allow(clippy::expect_used)]
                let response = response
                    .take()
                    .expect("ResponseFuture polled after completion");
                Poll::Ready(Ok(response))
            }
            StateProj::Called { future } => {
                let result = ready!(future.poll(cx)).map_err(Into::into);
                Poll::Ready(match this.context.take() {
                    Some(context) => context.complete(result),
                    None => result,
                })
            }
        }
    }
}

impl<F, T, C> fmt::Debug for ResponseFuture<F, T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Called { .. } => "called",
            State::Answered { .. } => "answered",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("context", &self.context)
            .finish()
    }
}
