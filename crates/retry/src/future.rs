//! [`ResponseFuture`], the response future of [`RetryBackoff`](crate::RetryBackoff).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{sleep_until, Instant, Sleep};
use toolwarden_core::classify::CallTimedOut;
use toolwarden_core::{Attempt, BoxError, CallKind, Classify, Event, McpRequest, McpResponse};
use tower_service::Service;

use crate::attempt_id;
use crate::layer::{BudgetHandle, Shared};
use crate::policy::{FailedAttempt, PolicyIndex, Verdict};
use crate::service::Instance;

pin_project! {
    /// Response future of [`RetryBackoff`](crate::RetryBackoff): drives one
    /// attempt after another until one is returned.
    ///
    /// States, as in tower's `Retry`: an attempt is in flight (*called*), the
    /// backoff runs (*waiting*), or the inner service is polled ready for the
    /// next attempt (*readying*). Nothing is boxed on the first attempt;
    /// the one timer (the backoff, then the deadline) is created, boxed, at
    /// the first retry, so a call that succeeds at once never touches the
    /// timer wheel nor the allocator for it.
    pub struct ResponseFuture<S, R, C>
    where
        S: Service<R>,
    {
        #[pin]
        state: State<S::Future>,
        timer: Timer,
        // The service of the retries: cloned from the instance's spare at
        // the first retry. Boxed: a service under a stack holds the handles
        // of every layer below, and only a retried call needs one.
        service: Option<Box<S>>,
        // `None` for a call passed through by a service left out of a stack.
        instance: Option<Arc<Instance<S, C>>>,
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

/// The backoff, then the deadline. Boxed once armed: a call that succeeds
/// at once never makes it, and the future stays small (a `Sleep` is over
/// 100 bytes, moved with the future by every layer above).
enum Timer {
    Idle,
    Armed(Pin<Box<Sleep>>),
}

impl Timer {
    fn arm(&mut self, at: Instant) {
        match self {
            Timer::Armed(sleep) => sleep.as_mut().reset(at),
            Timer::Idle => *self = Timer::Armed(Box::pin(sleep_until(at))),
        }
    }

    /// Ready once the armed instant has passed; never while idle.
    fn poll_elapsed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self {
            Timer::Armed(sleep) => sleep.as_mut().poll(cx),
            Timer::Idle => Poll::Pending,
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
    /// The latest failed attempt's result, returned if the deadline passes
    /// before the next attempt is made. Boxed, as `reached_failure`: only a
    /// retried call has one, and the future stays small for the others.
    last: Option<Box<Result<Resp, BoxError>>>,
    /// Whether the latest failure (the one being judged, then `last`) is
    /// known never to have reached the tool: a failure before sending, or a
    /// refusal by a layer below.
    last_never_sent: bool,
    /// The same, for `last` while a newer failure is judged.
    previous_never_sent: bool,
    /// Whether any failed attempt so far may have reached the tool.
    reached: bool,
    /// The latest failure that may have reached the tool, once a later
    /// failure that never did took `last`'s place: the call never ends on
    /// "never sent" when an earlier attempt reached the tool.
    reached_failure: Option<Box<Result<Resp, BoxError>>>,
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
        result: &mut Result<Resp, BoxError>,
    ) -> Option<Instant> {
        let kind = if self.request.is_tool_call() {
            CallKind::ToolCall
        } else {
            CallKind::Other
        };
        let outcome = shared.classifier.classify_result(kind, result);
        if outcome.is_success() {
            self.last_never_sent = false;
            return None;
        }
        // Noted before any verdict: if the deadline ends the call after this
        // attempt, it must not report a call that reached the tool as one
        // that never did.
        self.last_never_sent = outcome.before_sent || outcome.is_rejection();
        self.reached |= !self.last_never_sent;
        let now = Instant::now();
        let remaining = self.deadline(shared).saturating_duration_since(now);
        let rng = self.rng.get_or_insert_with(|| shared.rng());
        let failed = FailedAttempt {
            call: shared.policy.get(self.policy),
            request: &self.request,
            outcome: &outcome,
            attempt: self.attempt,
            previous: self.previous,
            remaining,
        };
        let verdict = shared.policy.verdict(&failed, rng);
        let Verdict::Retry(delay) = verdict else {
            return None;
        };
        // The delay is shorter than the remaining time, so this is in range.
        let at = now.checked_add(delay)?;
        if let Some(budget) = shared.budget.get(&self.budget) {
            if !budget.withdraw_at(now) {
                shared.events.emit(&Event::RetryBudgetExhausted {
                    key: self.request.target(),
                });
                return None;
            }
        }
        shared.events.emit(&Event::Retried {
            key: self.request.target(),
            attempt: self.attempt + 1,
            delay,
        });
        self.previous = delay;
        Some(at)
    }

    /// Keeps the failed attempt `result`, to be retried, for the deadline
    /// (and, if it may have reached the tool, for [`finish`](Self::finish)).
    fn keep(&mut self, result: Result<Resp, BoxError>) {
        if self.last_never_sent {
            // `last` is about to be replaced: keep it if it reached the tool.
            if let Some(previous) = self.last.take() {
                if !self.previous_never_sent {
                    self.reached_failure = Some(previous);
                }
            }
        } else {
            self.reached_failure = None;
        }
        self.previous_never_sent = self.last_never_sent;
        self.last = Some(Box::new(result));
    }

    /// The call's answer when no retry follows `result`: `result`, unless
    /// it is a failure that never reached the tool while an earlier attempt
    /// did; then that earlier failure, the truth about the call.
    fn finish(&mut self, result: Result<Resp, BoxError>) -> Result<Resp, BoxError> {
        if !(self.last_never_sent && self.reached) {
            return result;
        }
        match self.last.take() {
            Some(previous) if !self.previous_never_sent => *previous,
            _ => self
                .reached_failure
                .take()
                .map_or(result, |reached| *reached),
        }
    }

    /// The next attempt's request: a copy of the call's, carrying its
    /// attempt number and, on a raw JSON-RPC request, its own id (see
    /// [`attempt_id`]).
    fn next_request(&mut self) -> R {
        self.attempt += 1;
        let mut request = self.request.clone();
        request.insert_extension(Attempt(self.attempt));
        attempt_id::reidentify(&mut request, self.attempt);
        request
    }

    /// What the call answers when the deadline passes while an attempt is
    /// in flight (`in_flight`) or waits for the inner service's readiness.
    ///
    /// An attempt in flight may have reached the tool: the call fails with
    /// [`CallTimedOut`] (a timeout, not a failure before sending), never with
    /// the previous attempt's failure, which may say the request never left
    /// (a connect failure, a `CircuitOpen` refusal before the probe).
    /// Otherwise the previous failure is returned, unless it says the
    /// request never left while an earlier attempt may have reached the
    /// tool: then too the call timed out.
    fn cut_at_deadline<C>(
        &mut self,
        shared: &Shared<C>,
        in_flight: bool,
    ) -> Result<Resp, BoxError> {
        let last = self.last.take();
        match last {
            Some(last) if !(in_flight || self.last_never_sent && self.reached) => *last,
            _ => Err(Box::new(CallTimedOut {
                after: shared.policy.get(self.policy).deadline,
            })),
        }
    }
}

/// Once the deadline has passed while a retry runs (`in_flight`) or waits
/// for readiness: the call's answer (see [`Retry::cut_at_deadline`]). The
/// timer is armed only after a failed attempt was kept, so it never fires
/// during the first attempt.
fn poll_deadline<R, Resp, C>(
    timer: &mut Timer,
    retry: &mut Option<Retry<R, Resp>>,
    shared: &Shared<C>,
    in_flight: bool,
    cx: &mut Context<'_>,
) -> Poll<Result<Resp, BoxError>>
where
    R: McpRequest + Clone,
{
    if timer.poll_elapsed(cx).is_ready() {
        if let Some(retry) = retry.as_mut() {
            return Poll::Ready(retry.cut_at_deadline(shared, in_flight));
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
        instance: Arc<Instance<S, C>>,
        retry: Option<RetryState<R>>,
    ) -> Self {
        ResponseFuture {
            state: State::Called { future },
            timer: Timer::Idle,
            service: None,
            instance: Some(instance),
            retry: retry.map(|state| Retry {
                request: state.request,
                policy: state.policy,
                started: state.started,
                budget: state.budget,
                attempt: 1,
                previous: state.base_delay,
                rng: None,
                last: None,
                last_never_sent: false,
                reached: false,
                previous_never_sent: false,
                reached_failure: None,
            }),
        }
    }

    /// A call passed through untouched (see `RetryBackoff::passthrough`):
    /// one attempt, its answer as it is.
    pub(crate) fn passthrough(future: S::Future) -> Self {
        ResponseFuture {
            state: State::Called { future },
            timer: Timer::Idle,
            service: None,
            instance: None,
            retry: None,
        }
    }
}

impl<S, R, C> Future for ResponseFuture<S, R, C>
where
    R: McpRequest + Clone,
    S: Service<R> + Clone,
    S::Response: McpResponse,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let Some(instance) = this.instance.as_ref() else {
            // Passed through: the one attempt's answer, as it is.
            return match this.state.project() {
                StateProj::Called { future } => future.poll(cx).map_err(Into::into),
                // Unreachable: a call passed through never leaves `Called`.
                StateProj::Waiting | StateProj::Readying => Poll::Ready(Err(no_spare())),
            };
        };
        let shared = &*instance.shared;
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { future } => {
                    let mut result = match future.poll(cx) {
                        Poll::Ready(result) => result.map_err(Into::into),
                        // A retry still running at the deadline is dropped
                        // (cancelled) with the future, and the call times out.
                        Poll::Pending => {
                            return poll_deadline(this.timer, this.retry, shared, true, cx)
                        }
                    };
                    let Some(retry) = this.retry.as_mut() else {
                        return Poll::Ready(result);
                    };
                    if retry.attempt > 1 {
                        // The caller gets its own id back, whatever the attempt.
                        if let Ok(response) = &mut result {
                            attempt_id::restore(response, &retry.request);
                        }
                    }
                    let Some(at) = retry.decide(shared, &mut result) else {
                        return Poll::Ready(retry.finish(result));
                    };
                    retry.keep(result);
                    this.timer.arm(at);
                    this.state.set(State::Waiting);
                }
                StateProj::Waiting => {
                    ready!(this.timer.poll_elapsed(cx));
                    if let Some(retry) = this.retry.as_ref() {
                        // From now on the timer marks the deadline.
                        let deadline = retry.deadline(shared);
                        this.timer.arm(deadline);
                    }
                    this.state.set(State::Readying);
                }
                StateProj::Readying => {
                    if this.service.is_none() {
                        *this.service = instance.service().map(Box::new);
                    }
                    let Some(service) = this.service.as_mut() else {
                        // Unreachable: a call that may be retried made the
                        // spare before its first attempt.
                        return Poll::Ready(Err(no_spare()));
                    };
                    match service.poll_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(error)) => return Poll::Ready(Err(error.into())),
                        Poll::Pending => {
                            return poll_deadline(this.timer, this.retry, shared, false, cx)
                        }
                    }
                    #[allow(clippy::expect_used)]
                    let request = this
                        .retry
                        .as_mut()
                        .expect("invariant: only a call that may be retried leaves `Called`")
                        .next_request();
                    let future = service.call(request);
                    this.state.set(State::Called { future });
                }
            }
        }
    }
}

/// The error of a retry without a service to send it with: never returned
/// (the spare is made before a call that may be retried is sent), kept as
/// an error rather than a panic.
#[cold]
fn no_spare() -> BoxError {
    "toolwarden-retry: no inner service to send the retry with".into()
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
