//! [`ResponseFuture`]: the first attempt, and a hedge once it is slow.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{sleep_until, Instant, Sleep};
use toolwarden_core::jsonrpc::Id;
use toolwarden_core::{BoxError, CallKind, Classify, Event, McpRequest, McpResponse};
use tower_service::Service;

use crate::layer::{CallPolicy, RecordHandle, Shared};

/// What follows the caller's id in a hedge's id.
const MARKER: &str = "#tw-hedge";

/// The id a hedge of a request with id `original` carries:
/// `"<original>#tw-hedge"`, `<original>` as [`Id`]'s `Display` writes it
/// (`7#tw-hedge`, `"req-7"#tw-hedge`).
pub(crate) fn hedge_id(original: &Id) -> Id {
    Id::String(format!("{original}{MARKER}"))
}

pin_project! {
    /// Response future of [`Hedge`](crate::Hedge).
    ///
    /// A call that is never hedged is its inner future and nothing more. A
    /// hedgeable call polls its first attempt; the timer of the hedge (kept
    /// inline: nothing is allocated) is armed only when the first attempt
    /// did not answer at its first poll, so a call answered at once never
    /// touches the timer wheel. Once sent, the hedge is polled next to the
    /// first attempt; the loser is dropped with this future's state, which
    /// cancels it.
    pub struct ResponseFuture<S, R, C>
    where
        S: Service<R>,
    {
        #[pin]
        primary: Slot<S::Future>,
        #[pin]
        hedge: Slot<S::Future>,
        #[pin]
        timer: Timer,
        race: Option<Race<S, R, S::Response, C>>,
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

pin_project! {
    #[project = SlotProj]
    enum Slot<F> {
        Running {
            #[pin]
            future: F,
        },
        Done,
    }
}

impl<F> Slot<F> {
    fn is_running(&self) -> bool {
        matches!(self, Slot::Running { .. })
    }
}

/// Where a hedgeable call stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The first attempt runs; the timer (once armed) runs to the delay.
    Waiting,
    /// The delay passed and the budget paid: the service is polled ready.
    Readying,
    /// The hedge was sent.
    Sent,
    /// No hedge will be sent (refused by the budget, or the service failed
    /// its readiness).
    Off,
}

/// Where a call records its answer's latency.
enum Recorder {
    /// Nowhere: not sampled, or not waited for.
    Off,
    /// Its tool's own record ([`Shared::tool_record`]).
    Tool,
    /// Its key's record in the bounded map.
    Keyed(RecordHandle),
}

/// What a hedgeable call keeps.
pub(crate) struct Race<S, R, Resp, C> {
    service: S,
    /// The caller's request, until the hedge takes it.
    request: Option<R>,
    /// The caller's id, once the hedge carries its own.
    original_id: Option<Id>,
    shared: Arc<Shared<C>>,
    started: Instant,
    hedge_started: Option<Instant>,
    policy: CallPolicy,
    /// Where the answer's latency goes, set once the first attempt is
    /// found waiting (with a percentile) and only for a call whose answer
    /// is recorded: a call answered at its first poll never waited, could
    /// not have been hedged, and is not recorded.
    record: Recorder,
    phase: Phase,
    /// A failure held while the other attempt runs.
    held: Option<Box<Failure<Resp>>>,
}

/// An attempt's failure.
struct Failure<Resp> {
    result: Result<Resp, BoxError>,
    /// It says the request never left.
    unsent: bool,
    /// The first attempt's (else the hedge's).
    first: bool,
}

impl<Resp> Failure<Resp> {
    /// Which of two attempts' failures the call answers with: the first
    /// attempt's, what the call would have answered without a hedge;
    /// unless it never left and the hedge did, when "never sent" would
    /// not be true of the call (and a retry layer above would send again
    /// a tool that is not safe to repeat).
    fn answer(self, other: Self) -> Self {
        let (first, hedge) = if self.first {
            (self, other)
        } else {
            (other, self)
        };
        if first.unsent && !hedge.unsent {
            hedge
        } else {
            first
        }
    }
}

impl<S, R, Resp, C> Race<S, R, Resp, C> {
    pub(crate) fn new(
        service: S,
        request: R,
        shared: Arc<Shared<C>>,
        started: Instant,
        policy: CallPolicy,
    ) -> Self {
        Race {
            service,
            request: Some(request),
            original_id: None,
            shared,
            started,
            hedge_started: None,
            policy,
            record: Recorder::Off,
            phase: Phase::Waiting,
            held: None,
        }
    }

    /// An attempt failed: the other's failure, if held, and this one give
    /// the call's answer ([`Failure::answer`]).
    fn answer_failure(&mut self, failure: Failure<Resp>) -> Result<Resp, BoxError> {
        match self.held.take() {
            Some(held) => held.answer(failure).result,
            None => failure.result,
        }
    }

    /// Records a good answer of an attempt started at `since`.
    fn record(&self, since: Instant) {
        let Some(permille) = self.policy.percentile else {
            return;
        };
        let record = match &self.record {
            Recorder::Off => return,
            Recorder::Tool => self.shared.tool_record(&self.policy),
            Recorder::Keyed(handle) => Some(&**handle),
        };
        if let Some(record) = record {
            record.record(since.elapsed(), permille, self.policy.min_samples);
        }
    }

    /// The delay of the hedge: the key's percentile, else the fixed delay.
    ///
    /// The key's record is read in place (no handle taken); a handle is
    /// kept only by the calls whose answer is recorded (one in
    /// [`SAMPLE_EVERY`](crate::latency::SAMPLE_EVERY)), so the others cost
    /// one map read and no reference count.
    fn delay(&mut self) -> Duration
    where
        R: McpRequest,
    {
        if self.policy.percentile.is_none() {
            return self.policy.delay;
        }
        if let Some(record) = self.shared.tool_record(&self.policy) {
            // A tool with an override keeps its record beside it: no
            // lookup, no handle.
            if record.sample() {
                self.record = Recorder::Tool;
            }
            return record.percentile().unwrap_or(self.policy.delay);
        }
        let Some(request) = &self.request else {
            return self.policy.delay;
        };
        let key = self.shared.key_by.key(request);
        let latency = &self.shared.latency;
        // The percentile, and the record's handle when this call's answer
        // is to be recorded.
        let (percentile, record) = match latency.with_keep(&key, |r| (r.percentile(), r.sample())) {
            Some(read) => read,
            None => {
                // The key's first call that waits: its record is made.
                let record = latency.entry(key);
                (record.percentile(), record.sample().then_some(record))
            }
        };
        if let Some(handle) = record {
            self.record = Recorder::Keyed(handle);
        }
        percentile.unwrap_or(self.policy.delay)
    }
}

impl<S, R, C> ResponseFuture<S, R, C>
where
    S: Service<R>,
{
    /// A call that is never hedged.
    pub(crate) fn single(future: S::Future) -> Self {
        ResponseFuture {
            primary: Slot::Running { future },
            hedge: Slot::Done,
            timer: Timer::Idle,
            race: None,
        }
    }

    /// A hedgeable call whose first attempt is `future`.
    pub(crate) fn hedged(future: S::Future, race: Race<S, R, S::Response, C>) -> Self {
        ResponseFuture {
            primary: Slot::Running { future },
            hedge: Slot::Done,
            timer: Timer::Idle,
            race: Some(race),
        }
    }
}

impl<S, R, C> Future for ResponseFuture<S, R, C>
where
    R: McpRequest,
    S: Service<R>,
    S::Response: McpResponse,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            // The first attempt.
            if let SlotProj::Running { future } = this.primary.as_mut().project() {
                if let Poll::Ready(result) = future.poll(cx) {
                    this.primary.set(Slot::Done);
                    let mut result = result.map_err(Into::into);
                    let Some(race) = this.race.as_mut() else {
                        return Poll::Ready(result);
                    };
                    let outcome = race
                        .shared
                        .classifier
                        .classify_result(CallKind::ToolCall, &mut result);
                    if outcome.is_success() {
                        race.record(race.started);
                        return Poll::Ready(result);
                    }
                    let failure = Failure {
                        result,
                        unsent: outcome.before_sent,
                        first: true,
                    };
                    if !this.hedge.is_running() {
                        // No hedge in flight: the failure is the answer
                        // (repeating failures is the retry layer's job),
                        // with a failed hedge's if there was one.
                        return Poll::Ready(race.answer_failure(failure));
                    }
                    race.held = Some(Box::new(failure));
                }
            }
            let Some(race) = this.race.as_mut() else {
                return Poll::Pending;
            };
            // The hedge.
            if let SlotProj::Running { future } = this.hedge.as_mut().project() {
                if let Poll::Ready(result) = future.poll(cx) {
                    this.hedge.set(Slot::Done);
                    let mut result = result.map_err(Into::into);
                    if let (Ok(response), Some(id)) = (&mut result, &race.original_id) {
                        // The caller gets its own id back.
                        response.set_request_id(id);
                    }
                    let outcome = race
                        .shared
                        .classifier
                        .classify_result(CallKind::ToolCall, &mut result);
                    if outcome.is_success() {
                        if let Some(since) = race.hedge_started {
                            race.record(since);
                        }
                        return Poll::Ready(result);
                    }
                    let failure = Failure {
                        result,
                        unsent: outcome.before_sent,
                        first: false,
                    };
                    if !this.primary.is_running() {
                        // Both failed.
                        return Poll::Ready(race.answer_failure(failure));
                    }
                    // The first attempt may still answer well.
                    race.held = Some(Box::new(failure));
                }
            }
            if !this.primary.is_running() {
                // Only when the hedge is running (else the call returned).
                return Poll::Pending;
            }
            match race.phase {
                Phase::Waiting => {
                    if let TimerProj::Idle = this.timer.as_mut().project() {
                        let delay = race.delay();
                        let at = race.started.checked_add(delay).unwrap_or(race.started);
                        this.timer.set(Timer::Armed {
                            sleep: sleep_until(at),
                        });
                    }
                    if let TimerProj::Armed { sleep } = this.timer.as_mut().project() {
                        if sleep.poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                    }
                    this.timer.set(Timer::Idle);
                    if !race.shared.budget.withdraw() {
                        race.phase = Phase::Off;
                        return Poll::Pending;
                    }
                    race.phase = Phase::Readying;
                }
                Phase::Readying => match race.service.poll_ready(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(_)) => {
                        // The hedge cannot be sent; the first attempt goes on.
                        race.phase = Phase::Off;
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok(())) => {
                        let Some(mut request) = race.request.take() else {
                            race.phase = Phase::Off;
                            return Poll::Pending;
                        };
                        if let Some(id) = request.request_id() {
                            let id = id.clone();
                            request.set_request_id(hedge_id(&id));
                            race.original_id = Some(id);
                        }
                        let now = Instant::now();
                        race.shared.events.emit(&Event::Hedged {
                            key: request.target(),
                            delay: now.saturating_duration_since(race.started),
                        });
                        race.hedge_started = Some(now);
                        race.phase = Phase::Sent;
                        let future = race.service.call(request);
                        this.hedge.set(Slot::Running { future });
                        // Loop: the hedge is polled once, to be woken.
                    }
                },
                Phase::Sent | Phase::Off => return Poll::Pending,
            }
        }
    }
}

impl<S, R, C> fmt::Debug for ResponseFuture<S, R, C>
where
    S: Service<R>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("primary_running", &self.primary.is_running())
            .field("hedge_running", &self.hedge.is_running())
            .field("phase", &self.race.as_ref().map(|r| r.phase))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hedge_ids_are_distinct_from_the_callers_and_retries() {
        assert_eq!(hedge_id(&Id::Number(7)), Id::String("7#tw-hedge".into()));
        assert_eq!(
            hedge_id(&Id::String("7".into())),
            Id::String("\"7\"#tw-hedge".into())
        );
        // Below the retry layer: its retry's id gets the hedge marker too.
        assert_eq!(
            hedge_id(&Id::String("7#tw-retry-2".into())),
            Id::String("\"7#tw-retry-2\"#tw-hedge".into())
        );
        assert_ne!(hedge_id(&Id::Number(7)), hedge_id(&Id::String("7".into())));
    }
}
