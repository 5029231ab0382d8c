//! [`ResponseFuture`]: forwards the inner service's answer and records what
//! became of the call.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use toolwarden_core::{BoxError, CallKind, Classify, FailureClass, LoopDetected, OutcomeKind};

use crate::history::Mark;
use crate::sessions::SessionRef;

pin_project! {
    /// Response future of [`LoopGuard`](crate::LoopGuard).
    ///
    /// Resolves to the inner service's answer, or at once to a
    /// [`LoopDetected`] error for a refused call. When a guarded call ends,
    /// its outcome is classified and recorded in the session's history; a
    /// future dropped before that leaves the call neither succeeded nor failed.
    #[derive(Debug)]
    pub struct ResponseFuture<F, C> {
        #[pin]
        state: State<F>,
        recorder: Option<Recorder<C>>,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F> {
        // Forwarded to the inner service.
        Called { #[pin] future: F },
        // Refused: the inner service was not called.
        Blocked { error: LoopDetected },
    }
}

/// Records the outcome of one guarded call in its session's history.
#[derive(Debug)]
pub(crate) struct Recorder<C> {
    pub(crate) session: SessionRef,
    pub(crate) seq: u64,
    /// When the call was admitted (milliseconds since the guard's epoch).
    pub(crate) admitted_ms: u64,
    pub(crate) fingerprint: u64,
    pub(crate) classifier: C,
}

impl<C> Recorder<C> {
    fn record<T>(self, result: &mut Result<T, BoxError>)
    where
        C: Classify<T>,
    {
        let outcome = self.classifier.classify_result(CallKind::ToolCall, result);
        let mark = match outcome.kind {
            OutcomeKind::Success => Mark::Succeeded,
            // An HTTP server refusing the request itself (409, 422, a 401
            // without credentials): the agent's call is wrong, however it
            // arrived. It was neutral with the other transport outcomes, so
            // an agent repeating it was never stopped.
            OutcomeKind::Transport if outcome.class == Some(FailureClass::Client) => Mark::Failed,
            // The upstream was unreachable, or a layer below refused the
            // call: not the tool answering badly, so no loop is built.
            OutcomeKind::Transport | OutcomeKind::Timeout | OutcomeKind::Rejected => Mark::Neutral,
            // The tool answered badly: a tool error or a protocol error.
            _ => Mark::Failed,
        };
        self.session
            .settle(self.seq, self.fingerprint, mark, self.admitted_ms);
    }
}

impl<F, C> ResponseFuture<F, C> {
    /// A call that is not guarded (not a tool call, or an exempt tool).
    pub(crate) fn passthrough(future: F) -> Self {
        ResponseFuture {
            state: State::Called { future },
            recorder: None,
        }
    }

    /// A guarded call whose outcome `recorder` records.
    pub(crate) fn guarded(future: F, recorder: Recorder<C>) -> Self {
        ResponseFuture {
            state: State::Called { future },
            recorder: Some(recorder),
        }
    }

    /// A refused call.
    pub(crate) fn blocked(error: LoopDetected) -> Self {
        ResponseFuture {
            state: State::Blocked { error },
            recorder: None,
        }
    }
}

impl<F, C, T, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<T>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.state.project() {
            StateProj::Blocked { error } => Poll::Ready(Err(Box::new(error.clone()))),
            StateProj::Called { future } => {
                let mut result = ready!(future.poll(cx)).map_err(Into::into);
                if let Some(recorder) = this.recorder.take() {
                    recorder.record(&mut result);
                }
                Poll::Ready(result)
            }
        }
    }
}
