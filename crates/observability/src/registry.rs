//! The state one layer shares with every service it builds and with its
//! event sink: the bounded label sets, each series' statistics cell and
//! cached metric handles.

use std::time::Duration;

use metrics::{Counter, Histogram, SharedString};
use toolwarden_core::{Bounds, Entry, Key, KeyRef, KeyedState, McpRequest, Outcome, TOOLS_CALL};

use crate::active::{ActiveCall, ActiveSeries};
use crate::clock::{Clock, ClockSource, Stamp};
use crate::events::EventState;
use crate::instruments::{
    self, Cached, CANCELLED_OUTCOME, LABEL_ERROR_TYPE, LABEL_METHOD, LABEL_OUTCOME, LABEL_TOOL,
    METADATA, METRIC_CALLS, METRIC_OPERATION_DURATION, OTHER_LABEL_VALUE,
};
use crate::stats::{outcome_index, StatsCell, StatsSnapshot, OUTCOMES, OUTCOME_KINDS};

/// Validated configuration (see the builder for each knob).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Config {
    pub(crate) max_tools: usize,
    pub(crate) max_methods: usize,
    pub(crate) recent_window: usize,
    pub(crate) span_fingerprint: bool,
    pub(crate) clock: ClockSource,
}

impl Default for Config {
    /// The defaults written on [`ObservabilityBuilder`](crate::ObservabilityBuilder)'s knobs.
    fn default() -> Self {
        Config {
            max_tools: 100,
            max_methods: 32,
            recent_window: 100,
            span_fingerprint: true,
            clock: ClockSource::Fast,
        }
    }
}

pub(crate) struct Shared {
    pub(crate) config: Config,
    tools: KeyedState<Series>,
    methods: KeyedState<Series>,
    pub(crate) events: EventState,
    pub(crate) clock: Clock,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("tools", &self.tools.len())
            .field("methods", &self.methods.len())
            .finish_non_exhaustive()
    }
}

/// The label value of a key of the tool or method sets.
fn label_of(key: &Key) -> SharedString {
    match key {
        Key::Tool(name) => SharedString::from(name.clone()),
        // Only tool keys and the overflow key are ever inserted.
        _ => SharedString::const_str(OTHER_LABEL_VALUE),
    }
}

impl Shared {
    pub(crate) fn new(config: Config) -> Self {
        let clock = Clock::new(config.clock);
        let window = config.recent_window;
        // Admitted names stay for the life of the layer (no idle eviction):
        // evicting would admit new names and grow the recorder's series.
        let tool_clock = clock.clone();
        let tools = KeyedState::new(
            Bounds::max_keys(config.max_tools).idle_timeout(None),
            move |key| {
                Series::new(
                    key,
                    SharedString::const_str(TOOLS_CALL),
                    Some(label_of(key)),
                    window,
                    tool_clock.clone(),
                )
            },
        );
        let method_clock = clock.clone();
        let methods = KeyedState::new(
            Bounds::max_keys(config.max_methods).idle_timeout(None),
            move |key| Series::new(key, label_of(key), None, window, method_clock.clone()),
        );
        Shared {
            config,
            tools,
            methods,
            events: EventState::new(config.max_tools),
            clock,
        }
    }

    /// The series of a request: its tool for a `tools/call` with a name,
    /// else its method. Bounded: past the cap, the shared `other` series.
    /// `last` is the series of the previous call on the same service: names
    /// are never evicted, so when it matches it is still the live entry and
    /// the map lookup is skipped.
    #[inline]
    pub(crate) fn series<R: McpRequest>(
        &self,
        request: &R,
        last: &mut Option<Entry<Series>>,
    ) -> Entry<Series> {
        let tool = request.tool_name();
        if let Some(entry) = last.as_ref().filter(|e| e.matches(tool, request)) {
            return entry.clone();
        }
        let entry = match tool {
            Some(tool) => self.tools.entry(KeyRef::Tool(tool)),
            None => self.methods.entry(KeyRef::Tool(request.method())),
        };
        *last = Some(entry.clone());
        entry
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let collect = |state: &KeyedState<Series>| {
            let mut out: Vec<_> = state
                .entries()
                .iter()
                .map(|e| e.snapshot(&e.name, &self.clock))
                .collect();
            out.sort_by(|a, b| a.name.cmp(&b.name));
            let overflow = state.overflow();
            if overflow.stats.has_calls() || overflow.active.started() > 0 {
                out.push(overflow.snapshot(OTHER_LABEL_VALUE, &self.clock));
            }
            out
        };
        StatsSnapshot {
            taken_at_unix_ms: crate::stats::unix_ms_now(),
            tools: collect(&self.tools),
            methods: collect(&self.methods),
            events: self.events.totals(),
            circuits: self.events.circuits(),
        }
    }
}

/// One labelled series: a tool (tools/call) or a method.
pub(crate) struct Series {
    /// The tool name or method, for the snapshot.
    name: SharedString,
    /// Whether this is the shared series past the cap.
    overflow: bool,
    method: SharedString,
    tool: Option<SharedString>,
    pub(crate) stats: StatsCell,
    completed: [Cached<(Counter, Histogram)>; OUTCOME_KINDS],
    cancelled: Cached<Counter>,
    /// Calls in flight (the `toolwarden.calls.active` gauge).
    active: ActiveSeries,
    /// The layer's clock (a copy: the response future holds only this).
    pub(crate) clock: Clock,
}

impl Series {
    fn new(
        key: &Key,
        method: SharedString,
        tool: Option<SharedString>,
        window: usize,
        clock: Clock,
    ) -> Self {
        Series {
            name: tool.clone().unwrap_or_else(|| method.clone()),
            overflow: *key == Key::Overflow,
            method,
            tool,
            stats: StatsCell::new(window),
            completed: Default::default(),
            cancelled: Cached::default(),
            active: ActiveSeries::default(),
            clock,
        }
    }

    /// Whether this is the series of a request with `tool` (its tool name).
    /// The shared `other` series never matches: it stands for many names.
    #[inline]
    fn matches<R: McpRequest>(&self, tool: Option<&str>, request: &R) -> bool {
        if self.overflow {
            return false;
        }
        match (tool, &self.tool) {
            (Some(tool), Some(_)) => *self.name == *tool,
            (None, None) => *self.name == *request.method(),
            _ => false,
        }
    }

    /// The series' statistics, calls in flight included: started minus
    /// ended (completed or cancelled). The ended calls are read first, so
    /// a call that ends while the snapshot is taken can make `active` one
    /// too high, never negative.
    fn snapshot(&self, name: &str, clock: &Clock) -> crate::stats::CallStats {
        let mut stats = self.stats.snapshot(name, clock);
        stats.active = self.active.started().saturating_sub(stats.calls);
        stats
    }

    /// Counts a call in flight (see [`crate::active`]).
    #[inline]
    pub(crate) fn start_active(&self) -> ActiveCall {
        self.active.start(|| self.base_labels(0))
    }

    /// Counts a call out, when its future completes or is dropped.
    #[inline]
    pub(crate) fn end_active(call: &ActiveCall) {
        ActiveSeries::end(call);
    }

    fn base_labels(&self, extra: usize) -> Vec<metrics::Label> {
        let mut out = Vec::with_capacity(2 + extra);
        out.push(instruments::label(LABEL_METHOD, self.method.clone()));
        if let Some(tool) = &self.tool {
            out.push(instruments::label(LABEL_TOOL, tool.clone()));
        }
        out
    }

    /// Records a completed call.
    #[inline]
    pub(crate) fn record(&self, outcome: &Outcome, elapsed: Duration, end: Stamp) {
        let index = outcome_index(outcome.kind);
        self.stats.record(outcome.kind, elapsed, end);
        metrics::with_recorder(|recorder| {
            self.completed[index].with(
                recorder,
                |r| self.register_completed(r, index),
                |(calls, duration)| {
                    calls.increment(1);
                    duration.record(elapsed.as_secs_f64());
                },
            );
        });
    }

    #[cold]
    fn register_completed(
        &self,
        recorder: &dyn metrics::Recorder,
        index: usize,
    ) -> (Counter, Histogram) {
        let kind = OUTCOMES[index];
        let mut counter_labels = self.base_labels(1);
        counter_labels.push(instruments::label(LABEL_OUTCOME, kind.as_str()));
        let mut duration_labels = self.base_labels(1);
        if kind != toolwarden_core::OutcomeKind::Success {
            duration_labels.push(instruments::label(LABEL_ERROR_TYPE, kind.as_str()));
        }
        (
            recorder.register_counter(&instruments::key(METRIC_CALLS, counter_labels), &METADATA),
            recorder.register_histogram(
                &instruments::key(METRIC_OPERATION_DURATION, duration_labels),
                &METADATA,
            ),
        )
    }

    /// Records a call whose future was dropped before it finished.
    pub(crate) fn record_cancelled(&self, end: Stamp) {
        self.stats.record_cancelled(end);
        metrics::with_recorder(|recorder| {
            self.cancelled.with(
                recorder,
                |r| {
                    let mut l = self.base_labels(1);
                    l.push(instruments::label(LABEL_OUTCOME, CANCELLED_OUTCOME));
                    r.register_counter(&instruments::key(METRIC_CALLS, l), &METADATA)
                },
                |calls| calls.increment(1),
            );
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_stays_within_the_documented_memory() {
        // stats.rs documents about 2 KiB per tool plus the recent window,
        // and about 1.1 KiB per event key.
        let inline = std::mem::size_of::<Series>();
        let histogram = 129 * std::mem::size_of::<u64>();
        assert!(inline + histogram <= 2048, "{inline} + {histogram}");
        let events = std::mem::size_of::<crate::events::EventSeries>();
        assert!(events <= 1152, "{events}");
    }
}
