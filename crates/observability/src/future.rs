//! The response future of [`Observability`](crate::Observability).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use toolwarden_core::rejection::find_rejection;
use toolwarden_core::{BoxError, CallKind, Classify, Entry};
use tracing::Span;

use crate::active::ActiveCall;
use crate::clock::Stamp;
use crate::instruments::CANCELLED_OUTCOME;
use crate::registry::Series;

/// What the future needs to record the call when it ends.
pub(crate) struct InFlight<C> {
    pub(crate) series: Entry<Series>,
    pub(crate) start: Stamp,
    pub(crate) kind: CallKind,
    pub(crate) classifier: C,
    /// Counted in the in-flight gauge until this record is dropped.
    pub(crate) active: ActiveCall,
}

impl<C> Drop for InFlight<C> {
    /// The call has ended, completed or dropped: it leaves the in-flight
    /// gauge (both paths drop this record).
    fn drop(&mut self) {
        Series::end_active(&self.active);
    }
}

pin_project! {
    /// Response future of [`Observability`](crate::Observability): polls the
    /// inner future inside the call span and records the call when it ends,
    /// or as `cancelled` when dropped before.
    pub struct ResponseFuture<F, C> {
        #[pin]
        inner: F,
        call: Option<InFlight<C>>,
        span: Span,
    }

    impl<F, C> PinnedDrop for ResponseFuture<F, C> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(call) = this.call.take() {
                let end = call.series.clock.now();
                call.series.record_cancelled(end);
                if !this.span.is_disabled() {
                    this.span.record("outcome", CANCELLED_OUTCOME);
                    this.span.record("duration_ms", millis(call.series.clock.between(call.start, end)));
                }
            }
        }
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn new(inner: F, call: InFlight<C>, span: Span) -> Self {
        ResponseFuture {
            inner,
            call: Some(call),
            span,
        }
    }

    /// A future that only polls `inner` (a service left out of a stack).
    pub(crate) fn passthrough(inner: F) -> Self {
        ResponseFuture {
            inner,
            call: None,
            span: Span::none(),
        }
    }
}

fn millis(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
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
        let _entered = this.span.enter();
        let mut result = ready!(this.inner.poll(cx)).map_err(Into::into);
        if let Some(call) = this.call.take() {
            let end = call.series.clock.now();
            let elapsed = call.series.clock.between(call.start, end);
            let outcome = call.classifier.classify_result(call.kind, &mut result);
            call.series.record(&outcome, elapsed, end);
            if !this.span.is_disabled() {
                this.span.record("outcome", outcome.kind.as_str());
                if let Some(class) = outcome.class {
                    this.span.record("failure.class", class.as_str());
                }
                if let Some(error_type) = outcome.error_type() {
                    this.span.record("error.type", error_type);
                    this.span.record("otel.status_code", "ERROR");
                }
                if outcome.is_rejection() {
                    if let Err(e) = &result {
                        if let Some(rejection) = find_rejection(e.as_ref()) {
                            this.span
                                .record("toolwarden.rejected_by", rejection.layer());
                        }
                    }
                }
                this.span.record("duration_ms", millis(elapsed));
            }
        }
        Poll::Ready(result)
    }
}

impl<F, C> fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("finished", &self.call.is_none())
            .field("span", &self.span)
            .finish_non_exhaustive()
    }
}
