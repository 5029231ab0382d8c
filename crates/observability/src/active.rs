//! The in-flight gauge: how many calls of each tool (or method) have
//! started and not yet ended, as the metric [`METRIC_CALLS_ACTIVE`] and the
//! snapshot's [`CallStats::active`](crate::CallStats::active).
//!
//! A call counts from `Observability::call` until its response future
//! completes **or is dropped** (a caller that gave up, a timeout above the
//! layer): the decrement lives in the `Drop` of the future's call record,
//! so no path out of the future leaves the gauge high.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use metrics::{Gauge, Label, Recorder};

use crate::instruments::{Cached, METADATA};

/// The gauge of calls in flight per tool (or method),
/// `toolwarden.calls.active` (Prometheus: `toolwarden_calls_active`),
/// labelled `mcp.method.name` and `gen_ai.tool.name` (tool calls only).
///
/// OpenTelemetry has no MCP convention for it yet; the name follows the
/// crate's `toolwarden.calls` counter, and the instrument is what
/// OpenTelemetry calls an UpDownCounter of unit `{call}` (like
/// `http.server.active_requests`). Exported through the `metrics` facade
/// it is a gauge; an OTLP exporter should map it to an UpDownCounter.
pub const METRIC_CALLS_ACTIVE: &str = "toolwarden.calls.active";

/// The in-flight state of one series: the calls started (the snapshot's
/// `active` is started minus ended, the ended ones being the statistics'
/// completed and cancelled calls: one atomic add per call instead of two)
/// and the gauge handle per recorder.
#[derive(Default)]
pub(crate) struct ActiveSeries {
    started: AtomicU64,
    gauge: Cached<Gauge>,
}

impl ActiveSeries {
    /// Counts a call in; `labels` gives the series' labels when the gauge
    /// is registered with a recorder for the first time. The returned
    /// handle must be given back to [`ActiveSeries::end`] exactly once.
    #[inline]
    pub(crate) fn start(&self, labels: impl Fn() -> Vec<Label>) -> ActiveCall {
        self.started.fetch_add(1, Relaxed);
        let mut held = None;
        metrics::with_recorder(|recorder| {
            self.gauge.with(
                recorder,
                |r: &dyn Recorder| {
                    r.register_gauge(
                        &crate::instruments::key(METRIC_CALLS_ACTIVE, labels()),
                        &METADATA,
                    )
                },
                |gauge| {
                    gauge.increment(1.0);
                    held = Some(gauge.clone());
                },
            );
        });
        // The decrement goes to the recorder the increment went to, even if
        // the current recorder changes while the call runs.
        ActiveCall {
            gauge: held.unwrap_or_else(Gauge::noop),
        }
    }

    /// Counts a call out of the gauge (the statistics count it as
    /// completed or cancelled).
    #[inline]
    pub(crate) fn end(call: &ActiveCall) {
        call.gauge.decrement(1.0);
    }

    /// Calls started so far.
    pub(crate) fn started(&self) -> u64 {
        self.started.load(Relaxed)
    }
}

/// One call counted in by [`ActiveSeries::start`]: the gauge it went to.
pub(crate) struct ActiveCall {
    gauge: Gauge,
}
