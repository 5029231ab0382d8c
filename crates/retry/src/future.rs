//! [`ResponseFuture`], the response future of [`RetryBackoff`](crate::RetryBackoff).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{sleep_until, Instant, Sleep};
use toolwarden_core::{Attempt, BoxError, CallKind, Classify, Event, McpRequest};
use tower_service::Service;

use crate::layer::{BudgetHandle, Shared};
use crate::policy::{PolicyIndex, Verdict};

pin_project! {
    /// Response future of [`RetryBackoff`](crate::RetryBackoff): drives one
    /// attempt after another until one is returned.
    ///
    /// States, as in tower's `Retry`: an attempt is in flight (*called*), the
    /// backoff runs (*waiting*), or the inner service is polled ready for the
    /// next attempt (*readying*). Nothing is boxed; the one timer (the
    /// backoff, then the deadline) is created at the first retry, so a call
    /// that succeeds at once never touches the timer wheel.
    pub struct ResponseFuture<S, R, C>
    where
        S: Service<R>,
    {
        #[pin]
        state: State<S::Future>,
        #[pin]
        timer: Timer,
        service: S,
        shared: Arc<Shared<C>>,
        retry: Option<Retry<R, S::Response>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // An attempt is in flight.
        Called {
            #[pin]
            future: F,
        },
        // The backoff runs on the timer.
        Waiting,
        // The inner service is polled ready for the next attempt; the timer
        // marks the deadline.
        Readying,
    }
}

pin_project! {
    #[project = TimerProj]
    enum Timer {
        Idle,
        Armed {
            #[pin]
            sleep: Sleep,
        },
    }
}

impl Timer {
    fn arm(mut self: Pin<&mut Self>, at: Instant) {
        match self.as_mut().project() {
            TimerProj::Armed { sleep } => sleep.reset(at),
            TimerProj::Idle => self.set(Timer::Armed {
                sleep: sleep_until(at),
            }),
        }
    }

    /// Ready once the armed instant has passed; never while idle.
    fn poll_elapsed(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.project() {
            TimerProj::Armed { sleep } => sleep.poll(cx),
            TimerProj::Idle => Poll::Pending,
        }
    }
}

/// What [`RetryBackoff::call`](crate::RetryBackoff) hands to the future of
/// a call that may be retried.
pub(crate) struct RetryState<R> {
    /// The request as received, without an [`Attempt`].
    pub(crate) request: R,
    /// The knobs the call follows.
    pub(crate) policy: PolicyIndex,
    /// Their `base_delay`: the "previous delay" of the first retry.
    pub(crate) base_delay: Duration,
    /// When the first attempt started.
    pub(crate) started: Instant,
    /// The budget its retries withdraw from.
    pub(crate) budget: BudgetHandle,
}

/// What a call that may be retried keeps between attempts.
struct Retry<R, Resp> {
    /// The request as received, without an [`Attempt`].
    request: R,
    /// The attempts, backoff, deadline and classes of this call (its
    /// tool's or the layer's), chosen when the call was made.
    policy: PolicyIndex,
    /// When the first attempt started: the deadline counts from here.
    started: Instant,
    budget: BudgetHandle,
    /// Attempts made so far.
    attempt: u32,
    /// The delay before the latest retry (`base_delay` before any).
    previous: Duration,
    rng: Option<fastrand::Rng>,
    /// The latest failed attempt's result, returned if the deadline cuts
    /// the next attempt short.
    last: Option<Result<Resp, BoxError>>,
}

impl<R: McpRequest + Clone, Resp> Retry<R, Resp> {
    fn deadline<C>(&self, shared: &Shared<C>) -> Instant {
        // `build` bounds the deadline, so this does not overflow; if it
        // did, no retry would be made.
        self.started
            .checked_add(shared.policy.get(self.policy).deadline)
            .unwrap_or(self.started)
    }

    /// Judges the latest attempt: `Some(instant)` to retry at that instant
    /// (the budget has paid for it and the event is emitted), `None` to
    /// return its result.
    fn decide<C: Classify<Resp>>(
        &mut self,
        shared: &Shared<C>,
        result: &Result<Resp, BoxError>,
    ) -> Option<Instant> {
        let kind = if self.request.is_tool_call() {
            CallKind::ToolCall
        } else {
            CallKind::Other
        };
        let outcome = shared.classifier.classify(kind, result.as_ref());
        if outcome.is_success() {
            return None;
        }
        let now = Instant::now();
        let remaining = self.deadline(shared).saturating_duration_since(now);
        let rng = self.rng.get_or_insert_with(|| shared.rng());
        let verdict = shared.policy.verdict(
            shared.policy.get(self.policy),
            &self.request,
            &outcome,
            self.attempt,
            self.previous,
            remaining,
            rng,
        );
        let Verdict::Retry(delay) = verdict else {
            return None;
        };
        // The delay is shorter than the remaining time, so this is in range.
        let at = now.checked_add(delay)?;
        if let Some(budget) = shared.budget.get(&self.budget) {
            if !budget.withdraw_at(now) {
                shared.events.emit(&Event::BudgetExhausted {
                    tool: self.request.target(),
                });
                return None;
            }
        }
        shared.events.emit(&Event::Retry {
            tool: self.request.target(),
            attempt: self.attempt + 1,
            delay,
        });
        self.previous = delay;
        Some(at)
    }

    /// The next attempt's request.
    fn next_request(&mut self) -> R {
        self.attempt += 1;
        let mut request = self.request.clone();
        request.insert_extension(Attempt(self.attempt));
        request
    }
}

/// Once the deadline has passed while a retry runs or waits for readiness:
/// the previous attempt's result. The timer is armed only after a failed
/// attempt was kept, so a passed deadline always has one to return.
fn poll_deadline<R, Resp>(
    timer: Pin<&mut Timer>,
    retry: &mut Option<Retry<R, Resp>>,
    cx: &mut Context<'_>,
) -> Poll<Result<Resp, BoxError>> {
    if timer.poll_elapsed(cx).is_ready() {
        if let Some(last) = retry.as_mut().and_then(|r| r.last.take()) {
            return Poll::Ready(last);
        }
    }
    Poll::Pending
}

impl<S, R, C> ResponseFuture<S, R, C>
where
    S: Service<R>,
{
    /// `retry` is set for a call that may be retried, `None` for one that
    /// may not.
    pub(crate) fn new(
        future: S::Future,
        service: S,
        shared: Arc<Shared<C>>,
        retry: Option<RetryState<R>>,
    ) -> Self {
        ResponseFuture {
            state: State::Called { future },
            timer: Timer::Idle,
            service,
            shared,
            retry: retry.map(|state| Retry {
                request: state.request,
                policy: state.policy,
                started: state.started,
                budget: state.budget,
                attempt: 1,
                previous: state.base_delay,
                rng: None,
                last: None,
            }),
        }
    }
}

impl<S, R, C> Future for ResponseFuture<S, R, C>
where
    R: McpRequest + Clone,
    S: Service<R>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { future } => {
                    let result = match future.poll(cx) {
                        Poll::Ready(result) => result.map_err(Into::into),
                        // A retry still running at the deadline is dropped
                        // (cancelled) and the previous failure returned.
                        Poll::Pending => return poll_deadline(this.timer, this.retry, cx),
                    };
                    let Some(retry) = this.retry.as_mut() else {
                        return Poll::Ready(result);
                    };
                    let Some(at) = retry.decide(this.shared, &result) else {
                        return Poll::Ready(result);
                    };
                    retry.last = Some(result);
                    this.timer.as_mut().arm(at);
                    this.state.set(State::Waiting);
                }
                StateProj::Waiting => {
                    ready!(this.timer.as_mut().poll_elapsed(cx));
                    if let Some(retry) = this.retry.as_ref() {
                        // From now on the timer marks the deadline.
                        let deadline = retry.deadline(this.shared);
                        this.timer.as_mut().arm(deadline);
                    }
                    this.state.set(State::Readying);
                }
                StateProj::Readying => {
                    match this.service.poll_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(error)) => return Poll::Ready(Err(error.into())),
                        Poll::Pending => return poll_deadline(this.timer, this.retry, cx),
                    }
                    #[allow(clippy::expect_used)]
                    let request = this
                        .retry
                        .as_mut()
                        .expect("invariant: only a call that may be retried leaves `Called`")
                        .next_request();
                    let future = this.service.call(request);
                    this.state.set(State::Called { future });
                }
            }
        }
    }
}

impl<S, R, C> fmt::Debug for ResponseFuture<S, R, C>
where
    S: Service<R>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Called { .. } => "called",
            State::Waiting => "waiting",
            State::Readying => "readying",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("attempt", &self.retry.as_ref().map_or(1, |r| r.attempt))
            .finish_non_exhaustive()
    }
}
